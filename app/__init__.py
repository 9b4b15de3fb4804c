"""How people talk to it: the services (accounts, chat, memory, exports, admin) joining storage
and the adapter engine, the background compression worker, and the Gradio user interface."""
