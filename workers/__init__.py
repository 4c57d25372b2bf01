"""The edit worker: consumes the queue, trains experts, commits them, tells the API."""
