"""llama.cpp through llama-cpp-python's ctypes bindings: generation, embeddings, chat, grammars."""
