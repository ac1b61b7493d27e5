"""Print each given file's content whenever it changes (a pod process for volume tests).

One JSON line per change: {"path": ..., "content": ...}; a missing file has content null.
"""

import json
import sys
import time

last: dict[str, str | None] = {}
while True:
    for path in sys.argv[1:]:
        try:
            with open(path) as f:
                content: str | None = f.read()
        except FileNotFoundError:
            content = None
        if path not in last or last[path] != content:
            last[path] = content
            print(json.dumps({"path": path, "content": content}), flush=True)
    time.sleep(0.05)
