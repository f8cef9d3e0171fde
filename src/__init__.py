"""pipeserve: pipeline-parallel LLM serving."""
