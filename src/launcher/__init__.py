"""Process launcher (`pipeserve up`) and the small server that serves the built frontend."""
