"""The builder: turns endpoint rows into labelled containers on the local Docker Engine."""
