"""Tool definitions as Letta sends them to its model server (the OpenAI chat-completions `tools` entries)."""

from __future__ import annotations

from typing import Any

MEMORY_INSERT: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "memory_insert",
        "parameters": {
            "type": "object",
            "properties": {
                "label": {"type": "string"},
                "new_string": {"type": "string"},
                "insert_line": {"type": "integer"},
            },
            "required": ["label", "new_string"],
        },
    },
}
