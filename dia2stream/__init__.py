"""dia2stream: a streaming Dia2 TTS server for voice agents.

Rooms by job: `engine/` steps every call's slot in one batched frame, `call/` is one
connection's conversation, `wire/` the protocol and audio formats, `serve/` the server, HTTP,
limits and metrics, `voices/` voice preparation and its cache, `tools/` bench, load, soak and demo.
"""
