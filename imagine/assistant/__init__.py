"""The assistant: chat sessions, image analysis and prompt help through an Ollama server."""
