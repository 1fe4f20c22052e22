"""What the demo and the tests run on, offline: two self-verifying model zoos and a local S3 server."""
