"""Files: the weight file (safetensors with fastcell's config), read and written without torch."""
