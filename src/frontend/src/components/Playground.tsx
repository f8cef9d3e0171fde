// The playground: multi-turn chat (/v1/chat/completions) or raw completion (/v1/completions),
// streamed token by token. Stop aborts the fetch; the API cancels the request when the client
// disconnects. Every failure lands in the ErrorBanner; nothing is thrown out of an event handler.
import { useEffect, useRef, useState, type FormEvent, type KeyboardEvent } from "react";
import { fetchModels, streamChat, streamCompletion, type ChatMessage, type StreamResult } from "../api";
import { DEFAULT_CONTROLS, parseControls, type ControlValues } from "../params";
import { ErrorBanner } from "./ErrorBanner";
import { ParamControls } from "./ParamControls";
import { ReplyStats, type ReplyStatus } from "./ReplyStats";

export type Mode = "chat" | "completion";

interface Reply {
  text: string;
  status: ReplyStatus;
  liveTokens: number;
  result: StreamResult | null;
}

interface Turn {
  user: string;
  reply: Reply;
}

const emptyReply = (): Reply => ({ text: "", status: "streaming", liveTokens: 0, result: null });

/** The conversation the model sees: finished turns that produced text, then the new message. */
function buildMessages(turns: Turn[], next: string): ChatMessage[] {
  const msgs: ChatMessage[] = [];
  for (const t of turns) {
    if (t.reply.text === "") continue;
    msgs.push({ role: "user", content: t.user }, { role: "assistant", content: t.reply.text });
  }
  msgs.push({ role: "user", content: next });
  return msgs;
}

export function Playground() {
  const [mode, setMode] = useState<Mode>("chat");
  const [controls, setControls] = useState<ControlValues>(DEFAULT_CONTROLS);
  const [fieldErrors, setFieldErrors] = useState<Partial<Record<keyof ControlValues, string>>>({});
  const [chatInput, setChatInput] = useState("");
  const [prompt, setPrompt] = useState("");
  const [turns, setTurns] = useState<Turn[]>([]);
  const [completion, setCompletion] = useState<{ prompt: string; reply: Reply } | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [model, setModel] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const abortRef = useRef<AbortController | null>(null);
  const transcriptRef = useRef<HTMLDivElement | null>(null);

  // Learn the model id early; a failure here is reported when the user sends.
  useEffect(() => {
    const ctrl = new AbortController();
    fetchModels(ctrl.signal).then(
      (ids) => setModel((m) => m ?? ids[0] ?? null),
      () => undefined,
    );
    return () => ctrl.abort();
  }, []);

  // Leaving the page mid-reply cancels the request.
  useEffect(() => () => abortRef.current?.abort(), []);

  useEffect(() => {
    const el = transcriptRef.current;
    if (el) el.scrollTop = el.scrollHeight;
  }, [turns, completion]);

  const input = mode === "chat" ? chatInput : prompt;
  const setInput = mode === "chat" ? setChatInput : setPrompt;

  async function resolveModel(signal: AbortSignal): Promise<string> {
    if (model !== null) return model;
    const ids = await fetchModels(signal);
    const first = ids[0];
    if (first === undefined) throw new Error("The API serves no model (GET /v1/models returned an empty list)");
    setModel(first);
    return first;
  }

  async function send(): Promise<void> {
    if (busy) return;
    const text = input;
    if (text.trim() === "") return;
    const parsed = parseControls(controls);
    if (!parsed.ok) {
      setFieldErrors(parsed.errors);
      return;
    }
    setFieldErrors({});
    setError(null);
    const ctrl = new AbortController();
    abortRef.current = ctrl;
    setBusy(true);

    // Updates the reply being streamed, in whichever mode it belongs to.
    const update =
      mode === "chat"
        ? (f: (r: Reply) => Reply) =>
            setTurns((ts) => ts.map((t, i) => (i === ts.length - 1 ? { ...t, reply: f(t.reply) } : t)))
        : (f: (r: Reply) => Reply) => setCompletion((c) => (c ? { ...c, reply: f(c.reply) } : c));
    let gotText = false;
    const onText = (delta: string): void => {
      gotText = true;
      update((r) => ({ ...r, text: r.text + delta, liveTokens: r.liveTokens + 1 }));
    };

    const history = turns;
    if (mode === "chat") {
      setTurns((ts) => [...ts, { user: text, reply: emptyReply() }]);
      setChatInput("");
    } else {
      setCompletion({ prompt: text, reply: emptyReply() });
    }

    try {
      const modelId = await resolveModel(ctrl.signal);
      const result =
        mode === "chat"
          ? await streamChat({ model: modelId, messages: buildMessages(history, text), ...parsed.params }, { signal: ctrl.signal, onText })
          : await streamCompletion({ model: modelId, prompt: text, ...parsed.params }, { signal: ctrl.signal, onText });
      update((r) => ({ ...r, text: result.text, status: result.aborted ? "cancelled" : "done", result }));
    } catch (e) {
      if (ctrl.signal.aborted) {
        update((r) => ({ ...r, status: "cancelled" }));
      } else {
        setError(e);
        update((r) => ({ ...r, status: "error" }));
        // Nothing came back: give the message back to the input so it can be resent.
        if (mode === "chat" && !gotText) {
          setTurns((ts) => ts.slice(0, -1));
          setChatInput((cur) => (cur === "" ? text : cur));
        }
      }
    } finally {
      if (abortRef.current === ctrl) abortRef.current = null;
      setBusy(false);
    }
  }

  function stop(): void {
    abortRef.current?.abort();
  }

  function onSubmit(e: FormEvent): void {
    e.preventDefault();
    void send();
  }

  function onKeyDown(e: KeyboardEvent<HTMLTextAreaElement>): void {
    const submit = mode === "chat" ? !e.shiftKey : e.ctrlKey || e.metaKey;
    if (e.key === "Enter" && submit && !e.nativeEvent.isComposing) {
      e.preventDefault();
      void send();
    }
  }

  function clear(): void {
    if (mode === "chat") setTurns([]);
    else setCompletion(null);
    setError(null);
  }

  return (
    <section className="panel playground" aria-labelledby="playground-title">
      <header className="panel-head">
        <h2 id="playground-title">Playground</h2>
        <div className="segmented" role="tablist" aria-label="Mode">
          <button
            type="button"
            role="tab"
            aria-selected={mode === "chat"}
            data-testid="mode-chat"
            disabled={busy}
            onClick={() => setMode("chat")}
          >
            Chat
          </button>
          <button
            type="button"
            role="tab"
            aria-selected={mode === "completion"}
            data-testid="mode-completion"
            disabled={busy}
            onClick={() => setMode("completion")}
          >
            Completion
          </button>
        </div>
        <span className="muted small" data-testid="model-name">
          {model ?? "model unknown"}
        </span>
      </header>

      <div className="transcript" ref={transcriptRef}>
        {mode === "chat" ? (
          turns.length === 0 ? (
            <p className="muted empty">Send a message to start a conversation.</p>
          ) : (
            turns.map((t, i) => {
              const isLatest = i === turns.length - 1;
              return (
                <div className="turn" key={i}>
                  <div className="msg msg-user" data-testid="message-user">
                    {t.user}
                  </div>
                  <div className={`msg msg-assistant status-${t.reply.status}`} data-testid={isLatest ? "reply" : "message-assistant"}>
                    {t.reply.text}
                    {t.reply.status === "streaming" && <span className="cursor" aria-hidden="true" />}
                  </div>
                  {isLatest && <ReplyStats status={t.reply.status} liveTokens={t.reply.liveTokens} result={t.reply.result} />}
                </div>
              );
            })
          )
        ) : completion === null ? (
          <p className="muted empty">Write a prompt; the model continues it.</p>
        ) : (
          <div className="turn">
            <div className="msg msg-completion">
              <span className="prompt-echo">{completion.prompt}</span>
              <span className={`status-${completion.reply.status}`} data-testid="reply">
                {completion.reply.text}
              </span>
              {completion.reply.status === "streaming" && <span className="cursor" aria-hidden="true" />}
            </div>
            <ReplyStats status={completion.reply.status} liveTokens={completion.reply.liveTokens} result={completion.reply.result} />
          </div>
        )}
      </div>

      {error !== null && <ErrorBanner error={error} onDismiss={() => setError(null)} />}

      <form className="composer" onSubmit={onSubmit}>
        <textarea
          data-testid="prompt-input"
          aria-label={mode === "chat" ? "Message" : "Prompt"}
          rows={mode === "chat" ? 2 : 5}
          value={input}
          placeholder={mode === "chat" ? "Message (Enter to send, Shift+Enter for a new line)" : "Prompt (Ctrl+Enter to send)"}
          onChange={(e) => setInput(e.target.value)}
          onKeyDown={onKeyDown}
        />
        <div className="composer-actions">
          <button type="submit" className="primary" data-testid="send-button" disabled={busy || input.trim() === ""}>
            Send
          </button>
          <button type="button" className="danger" data-testid="stop-button" disabled={!busy} onClick={stop}>
            Stop
          </button>
          {mode === "completion" && completion !== null && completion.reply.status !== "streaming" && (
            <button type="button" data-testid="continue-button" onClick={() => setPrompt(completion.prompt + completion.reply.text)}>
              Use as prompt
            </button>
          )}
          <button
            type="button"
            className="link"
            data-testid="clear-button"
            disabled={busy || (mode === "chat" ? turns.length === 0 : completion === null)}
            onClick={clear}
          >
            {mode === "chat" ? "New chat" : "Clear"}
          </button>
        </div>
      </form>

      <ParamControls values={controls} errors={fieldErrors} disabled={busy} onChange={setControls} />
    </section>
  );
}
