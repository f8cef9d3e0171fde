"""Conversions between the REST schemas and the coordinator's protobuf messages: request bodies to
GenerateRequest, and a finished generation's summary to usage, finish reason, the `pipeserve`
extension and OpenAI-style logprobs. Pure functions: no I/O (token texts are passed in).
"""

from __future__ import annotations

from pipeserve.api import schemas as s
from pipeserve.common import wire
from pipeserve.common.errors import InvalidInputError
from pipeserve.common.sampling_params import SamplingParams
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import tokenizer_service_pb2 as tpb

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}


def sampling(body: s.SamplingFields, logprobs: bool = False, top_logprobs: int = 0) -> pb.SamplingParams:
    """The body's sampling fields as the domain's SamplingParams, on the wire (common/wire.py holds
    the one field-by-field conversion)."""
    params = SamplingParams(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    return wire.sampling_to_pb(params)


def _base(
    body: s.SamplingFields, rid: str, default_max_tokens: int, max_tokens: int | None
) -> pb.GenerateRequest:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return pb.GenerateRequest(
        request_id=rid,
        max_tokens=max_tokens or default_max_tokens,
        stop=stop,
        ignore_eos=body.ignore_eos,
        speculative=body.speculative,
    )


def process_request(body: s.ProcessRequest, rid: str, default_max_tokens: int) -> pb.GenerateRequest:
    req = _base(body, rid, default_max_tokens, body.max_tokens)
    req.sampling.CopyFrom(sampling(body))
    if body.metadata.type == "chat":
        req.messages.append(tpb.ChatMessage(role="user", content=body.text))
    else:
        req.prompt = body.text
    return req


def completion_request(body: s.CompletionRequest, rid: str, default_max_tokens: int) -> pb.GenerateRequest:
    req = _base(body, rid, default_max_tokens, body.max_tokens)
    wanted = body.logprobs is not None
    req.sampling.CopyFrom(sampling(body, logprobs=wanted, top_logprobs=body.logprobs or 0))
    prompt = body.prompt
    if isinstance(prompt, str):
        req.prompt = prompt
    elif prompt and all(isinstance(p, int) for p in prompt):
        req.prompt_token_ids.extend(prompt)  # type: ignore[arg-type]
    elif len(prompt) == 1 and isinstance(prompt[0], str):
        req.prompt = prompt[0]
    else:
        raise InvalidInputError(
            f"prompt: give one prompt (a string, or a list of token ids); got a list of {len(prompt)}",
            param="prompt",
        )
    return req


def chat_request(body: s.ChatCompletionRequest, rid: str, default_max_tokens: int) -> pb.GenerateRequest:
    if body.top_logprobs and not body.logprobs:
        raise InvalidInputError("top_logprobs: needs logprobs set to true", param="top_logprobs")
    req = _base(body, rid, default_max_tokens, body.max_tokens or body.max_completion_tokens)
    req.sampling.CopyFrom(sampling(body, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0))
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        req.messages.append(
            tpb.ChatMessage(role="system" if m.role == "developer" else m.role, content=content)
        )
    return req


def finish_reason(final: pb.GenerateResponse) -> s.FinishReason:
    return FINISH_REASONS.get(final.finish_reason, "stop")  # type: ignore[return-value]


def usage(final: pb.GenerateResponse) -> s.Usage:
    return s.Usage(
        prompt_tokens=final.prompt_tokens,
        completion_tokens=final.completion_tokens,
        total_tokens=final.prompt_tokens + final.completion_tokens,
    )


def speculative_view(st: pb.SpeculativeStats) -> s.SpeculativeView:
    return s.SpeculativeView(
        drafted=st.drafted,
        accepted=st.accepted,
        acceptance_rate=st.accepted / st.drafted if st.drafted else 0.0,
        passes=st.passes,
        tokens_per_pass=st.tokens / st.passes if st.passes else 1.0,
    )


def pipeserve_info(final: pb.GenerateResponse) -> s.PipeserveInfo:
    return s.PipeserveInfo(
        request_id=final.request_id,
        route=[s.RouteHop(part=r.part, node_id=r.node_id, address=r.address) for r in final.route],
        ttft_ms=final.ttft_ms,
        total_ms=final.total_ms,
        queue_ms=final.queue_ms,
        failovers=final.failovers,
        speculative=speculative_view(final.speculative),
        stage_timings=[
            s.StageTiming(
                part=t.part,
                node_id=t.node_id,
                forward_ms=t.forward_ms,
                hop_ms=t.hop_ms,
                bytes_sent=t.bytes_sent,
            )
            for t in final.stage_timings
        ],
    )


def logprob_ids(msgs: list[pb.GenerateResponse]) -> list[int]:
    """Every token id whose text the logprobs of these messages show."""
    ids = [lp.token_id for m in msgs for lp in m.logprobs]
    ids += [a.token_id for m in msgs for alts in m.top_logprobs for a in alts.alternatives]
    return ids


def chat_logprobs(msgs: list[pb.GenerateResponse], texts: dict[int, str]) -> s.ChatLogprobs:
    content = []
    for m in msgs:
        for i, lp in enumerate(m.logprobs):
            alts = m.top_logprobs[i].alternatives if i < len(m.top_logprobs) else []
            content.append(
                s.TokenLogprob(
                    token=texts[lp.token_id],
                    logprob=lp.logprob,
                    top_logprobs=[s.TopLogprob(token=texts[a.token_id], logprob=a.logprob) for a in alts],
                )
            )
    return s.ChatLogprobs(content=content)


def completion_logprobs(
    msgs: list[pb.GenerateResponse], texts: dict[int, str], offset: int
) -> s.CompletionLogprobs:
    """OpenAI's legacy format; `offset` is the text length before these tokens."""
    out = s.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for m in msgs:
        for i, lp in enumerate(m.logprobs):
            alts = m.top_logprobs[i].alternatives if i < len(m.top_logprobs) else []
            token = texts[lp.token_id]
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({texts[a.token_id]: a.logprob for a in alts})  # type: ignore[union-attr]
            out.text_offset.append(offset)
            offset += len(token)
    return out


def cluster_view(
    coordinator_address: str,
    model_name: str,
    status: pb.ClusterStatusResponse | None,
    coordinator_error: str = "",
    tokenizer: s.TokenizerView | None = None,
) -> s.ClusterView:
    """GET /api/cluster from ClusterStatus; without one (the coordinator is unreachable) the view
    says so, with the tokenizer as the API itself sees it."""
    if status is None:
        return s.ClusterView(
            ready=False,
            problems=[coordinator_error or f"the coordinator at {coordinator_address} is unreachable"],
            model=s.ModelView(name=model_name, checksum="", arch="", n_layers=0),
            coordinator=s.CoordinatorView(
                address=coordinator_address,
                healthy=False,
                running=0,
                waiting=0,
                max_running=0,
                max_waiting=0,
                micro_batches=0,
                micro_batches_reason="",
                speculative_method="",
                speculative_max_draft=0,
                speculative=speculative_view(pb.SpeculativeStats()),
            ),
            tokenizer=tokenizer or s.TokenizerView(address="", healthy=False, vocab_size=0, error="unknown"),
            nodes=[],
        )
    return s.ClusterView(
        ready=status.ready,
        problems=list(status.problems),
        model=s.ModelView(
            name=status.model_name or model_name,
            checksum=status.model_checksum,
            arch=status.arch,
            n_layers=status.n_layers,
        ),
        coordinator=s.CoordinatorView(
            address=coordinator_address,
            healthy=True,
            running=status.running,
            waiting=status.waiting,
            max_running=status.max_running,
            max_waiting=status.max_waiting,
            micro_batches=status.micro_batches,
            micro_batches_reason=status.micro_batches_reason,
            speculative_method=status.speculative_method,
            speculative_max_draft=status.speculative_max_draft,
            speculative=speculative_view(status.speculative),
        ),
        tokenizer=s.TokenizerView(
            address=status.tokenizer_address,
            healthy=status.tokenizer_healthy,
            vocab_size=status.tokenizer.vocab_size,
            error=status.tokenizer_error or None,
        ),
        nodes=[_node_view(n) for n in status.nodes],
    )


def _node_view(n: pb.NodeStatus) -> s.NodeView:
    info = n.info if n.HasField("info") else pb.NodeInfo()
    layers = n.layers if n.HasField("layers") else info.layers
    return s.NodeView(
        id=n.id,
        address=n.address,
        part=n.model_part,
        layers=(layers.start_layer, layers.end_layer),
        healthy=n.healthy,
        error=n.error or None,
        requests_in_flight=info.active_requests or info.in_flight,
        cache_used_tokens=info.cache_used_tokens,
        cache_budget_tokens=info.cache_budget_tokens,
        cache_block_size=info.cache_block_size,
        kv_dtype=info.kv_dtype or "f32",
        kv_window=info.kv_window,
        cache_blocks_total=info.cache_blocks_total,
        cache_blocks_free=info.cache_blocks_free,
        prefix_cached_blocks=info.prefix_cached_blocks,
        prefix_hit_tokens=info.prefix_hit_tokens,
        backoff_s=round(n.backoff_s, 1),
        rss_bytes=info.rss_bytes,
        cache_resident_bytes=info.cache_resident_bytes,
        weights_bytes=info.param_bytes,
        weight_types=dict(info.weight_types),
        kernel=(
            f"{info.kernel_isa} x{info.kernel_threads}{' int8' if info.kernel_int8 else ''}"
            f"{' batch-invariant' if info.batch_invariant else ''}"
            if info.kernel_isa
            else ""
        ),
        threads_reason=info.threads_reason,
        host_id=info.host_id,
        last_forward_ms=info.last_forward_ms if info.forwards_total else None,
        mean_forward_ms=info.forward_ms_total / info.forwards_total if info.forwards_total else None,
        forwards_total=info.forwards_total,
        capacity=s.CapacityView(
            limit_bytes=info.capacity.limit_bytes,
            layer_bytes=info.capacity.layer_bytes,
            kv_tokens=info.capacity.kv_tokens,
            ms_per_layer=info.capacity.ms_per_layer,
        )
        if info.HasField("capacity")
        else None,
        memory=_memory_view(info.memory) if info.HasField("memory") else None,
        load_s=round(info.load_seconds, 3) if n.HasField("info") else None,
    )


def _memory_view(m: pb.MemoryBudget) -> s.MemoryView:
    need = m.weights_bytes + m.kv_bytes + m.runtime_bytes
    return s.MemoryView(
        limit_bytes=m.limit_bytes,
        limit_source=m.source,
        limit_reason=m.reason,
        weights_bytes=m.weights_bytes,
        kv_bytes=m.kv_bytes,
        runtime_bytes=m.runtime_bytes,
        need_bytes=need,
        left_bytes=m.limit_bytes - need,
    )
