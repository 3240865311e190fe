"""The data plane: routing table, replica choice and byte-for-byte proxying to replicas."""
