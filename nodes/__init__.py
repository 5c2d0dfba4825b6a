"""ComfyUI nodes: thin adapters over `lmdiff_core` (issue 5 adds them; the pack loads with none until then)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
