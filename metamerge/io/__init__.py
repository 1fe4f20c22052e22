"""Everything that leaves the process: the S3 client and its error mapping, content digests,
local outputs that are never half-written, publishing and reading publishes, the shared store."""
