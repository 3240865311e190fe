"""The api's fast lane for inference requests: `front` (the connection protocol and its narrow
head parser), `admit` (what the lane may serve), `exchange` (relaying one request)."""
