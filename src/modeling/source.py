"""The old home of `pipeserve.common.model_files`, kept importable for src/node until it imports
the common module directly; new code imports `pipeserve.common.model_files`."""

from pipeserve.common.model_files import ModelSource, release_file_caches, resolve_model

__all__ = ["ModelSource", "release_file_caches", "resolve_model"]
