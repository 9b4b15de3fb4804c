"""How people talk to it: the chat service (storage + adapter engine), its background
compression worker, and the Gradio user interface."""
