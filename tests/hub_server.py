"""A local stand-in for the Hugging Face Hub's upload API, for testing ``mmdiff push`` offline.

It implements what ``HfApi.create_repo`` and ``HfApi.upload_folder`` call: repo creation, preupload
(every file "regular", so contents travel base64-encoded inside the commit) and the NDJSON commit;
committed files are written under ``root/<namespace>/<name>/``. Run as
``python hub_server.py ROOT PORT_FILE``: it serves on a free port on 127.0.0.1 and writes the port.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubHandler(BaseHTTPRequestHandler):
    root: Path

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self._body()
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
            (self.root / repo_id).mkdir(parents=True, exist_ok=True)
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id, "id": repo_id})
        if self.path == "/api/validate-yaml":  # the README's metadata block, checked before upload
            return self._reply(200, {"errors": [], "warnings": []})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/?]+)", self.path):
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files], "commitOid": "0" * 40})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/?]+)", self.path):
            repo = self.root / match.group(1)
            if not repo.is_dir():
                return self._reply(404, {"error": "Repository not found"})
            for line in body.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    target = repo / entry["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(entry["value"]["content"]))
                elif entry["key"] == "header":
                    (repo / ".commit_message").write_text(entry["value"]["summary"])
            return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{match.group(1)}/commit/{'1' * 40}",
                                     "commitOid": "1" * 40, "success": True})
        return self._reply(404, {"error": f"not implemented in the stand-in: POST {self.path}"})

    def do_GET(self):  # noqa: N802
        return self._reply(404, {"error": f"not implemented in the stand-in: GET {self.path}"})


def main(root: str, port_file: str) -> None:
    HubHandler.root = Path(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:3])
