"""dia2stream: a real-time streaming TTS server for voice agents, on Dia2."""
