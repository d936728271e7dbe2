-- wrk script for the gateway example: POST one sentence as a JSON request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"inputs": ["The quick brown fox jumps over the lazy dog."]}'
