#!/usr/bin/python3
"""Peak memory of the gateway and the broker under one large upload.

Starts a private redis-server, `gmi broker`, `gmi gateway` and the upload route's workers
(decode, embed, spec), makes --images incompressible PNGs of --image-mb MiB each (noise,
so that the bytes on the wire are what they say), uploads them as one model through HTTP
(one multipart POST of about --images x --image-mb MiB), waits for the spec job to end,
and reports each process's peak resident memory (VmHWM) against the upload's size.

usage: scripts/bench_upload_memory.py [--gmi build/tools/gmi] [--images 16] [--image-mb 16]
                                      [--json]
"""
import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
import struct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import ROOT, Supervisor, multipart, service_env, start_redis  # noqa: E402


def noise_png(width, height):
    """An RGB PNG of random pixels (stored with zlib level 0: noise does not compress)."""
    rows = b"".join(b"\0" + os.urandom(width * 3) for _ in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))


def vm_hwm_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--gmi", default=os.path.join(ROOT, "build", "tools", "gmi"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--image-mb", type=float, default=16)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if not os.access(args.gmi, os.X_OK):
        print("bench_upload_memory: %s is not an executable gmi" % args.gmi, file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="gmi-upmem-")
    side = int((args.image_mb * 2**20 / 3) ** 0.5)
    images = [("img%03d.png" % i, noise_png(side, side)) for i in range(args.images)]
    total = sum(len(d) for n, d in images)

    _, redis, r = start_redis(tmp, persistent=False)
    env, gport = service_env(r.port, {
        "GMI_ENCODER_IMAGE": "builtin", "GMI_GATEWAY_BROKER_TIMEOUT_MS": "60000",
        "GMI_GATEWAY_MAX_UPLOAD_BYTES": str(total + (1 << 20)),
        "GMI_BROKER_MAX_MESSAGE_BYTES": str(total + (4 << 20)),
    })
    sup = Supervisor(args.gmi, env, tmp)
    sup.start("broker", ["broker"])
    sup.start("gateway", ["gateway"])
    for stage in ("decode", "embed", "spec"):
        sup.start(stage, ["worker", "--stage", stage])
    for _ in range(200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", gport, timeout=5)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    pids = sup.pids()
    before = {n: vm_hwm_mb(pids[n]) for n in ("gateway", "broker")}
    manifest = "".join(json.dumps({"image": n, "prompt": "noise %d" % i}) + "\n" for i, (n, d) in enumerate(images))
    body, ctype = multipart([("manifest", manifest)], images)
    t0 = time.time()
    c = http.client.HTTPConnection("127.0.0.1", gport, timeout=300)
    c.request("POST", "/v1/models/big/uploads", body=body, headers={"Content-Type": ctype})
    res = c.getresponse()
    answer = json.loads(res.read() or b"{}")
    accepted_s = time.time() - t0
    state = "not accepted (HTTP %d: %s)" % (res.status, answer.get("error", ""))
    if res.status == 202:
        while time.time() - t0 < 600:
            c = http.client.HTTPConnection("127.0.0.1", gport, timeout=60)
            c.request("GET", "/v1/jobs/%s?wait_ms=10000" % answer["job_id"])
            job = json.loads(c.getresponse().read())
            if job.get("state") in ("finished", "failed"):
                state = job["state"] + ("" if job["state"] == "finished" else ": " + job.get("error", ""))
                break
    after = {n: vm_hwm_mb(pids[n]) for n in ("gateway", "broker")}
    sup.stop_all()
    redis.terminate()
    redis.wait()
    subprocess.run(["rm", "-rf", tmp])
    out = {"upload_mib": round(len(body) / 2**20, 1), "images": args.images, "accepted_s": round(accepted_s, 2),
           "job": state}
    for n in ("gateway", "broker"):
        out[n + "_peak_mib"] = round(after[n], 1)
        out[n + "_idle_mib"] = round(before[n], 1)
        out[n + "_peak_per_upload_byte"] = round((after[n] - before[n]) * 2**20 / len(body), 2)
    if args.json:
        print(json.dumps(out))
    else:
        print("upload: %.1f MiB in %d images, accepted in %.2f s, job %s" % (out["upload_mib"], args.images,
                                                                          accepted_s, state))
        print("%-8s %10s %10s %18s" % ("process", "idle MiB", "peak MiB", "(peak-idle)/upload"))
        for n in ("gateway", "broker"):
            print("%-8s %10.1f %10.1f %18.2f" % (n, before[n], after[n], out[n + "_peak_per_upload_byte"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
