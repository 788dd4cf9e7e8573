"""llama-server with LoRA adapters: memory, speed and management endpoints (run from the repo root after
make_models.py: PYTHONPATH=$PWD .venv/bin/python bench/lora_router/router_vs_single.py router f16 norepack probe speed;
LORA_BENCH_DIR=folder, LLAMA_SERVER=binary). Router mode (--models-preset) vs one server with every --lora, on the pinned llama-server."""

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path[:0] = ["tests"]
import openai  # noqa: E402
from _llama_server import free_port  # noqa: E402

SERVER = os.environ["LLAMA_SERVER"]
root = Path(os.environ.get("LORA_BENCH_DIR", "/tmp/lora-scratch/router"))
KEY = "sk-test-key"
NAMES = ["base", "ad1", "ad2", "ad3"]
PROMPT = "The quick brown fox"


def req(url, path, body=None, method=None, key=KEY):
    data = json.dumps(body).encode() if body is not None else None
    r = urllib.request.Request(
        url + path,
        data=data,
        method=method or ("POST" if data else "GET"),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def smaps(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            k, *v = line.split()
            if v and v[-1] == "kB":
                out[k.rstrip(":")] = int(v[0]) / 1024
    except OSError:
        return None
    return out


def children(pid):
    r = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        p, args = line.strip().split(None, 1)
        a = args.split()
        out[a[a.index("--alias") + 1] if "--alias" in a else args[:40]] = int(p)
    return out


def mem_report(label, pids):
    rows = {n: smaps(p) for n, p in pids.items()}
    tot_pss = sum(r["Pss"] for r in rows.values() if r)
    print(
        f"  {label}: "
        + "; ".join(
            f"{n} RSS {r['Rss']:.0f} PSS {r['Pss']:.0f} (file {r.get('Pss_File', 0):.0f}, anon {r.get('Pss_Anon', 0):.0f}) MB"
            for n, r in rows.items()
            if r
        )
        + f"; total PSS {tot_pss:.0f} MB"
    )
    return tot_pss


def wait_health(url, proc, t=120):
    end = time.time() + t
    while time.time() < end:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        assert proc.poll() is None, "server died"
        time.sleep(0.2)
    raise TimeoutError


def start(args, log):
    port = free_port()
    cmd = [SERVER, "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--no-webui", *args]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_health(url, proc)
    return proc, url


def stop(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def preset(quant, extra=""):
    p = root / f"preset-{quant}.ini"
    base = root / f"base-{quant}.gguf"
    text = f"version = 1\n\n[*]\nc = 1024\nnp = 2\nt = 2\n{extra}\n[base]\nmodel = {base}\n"
    for i in (1, 2, 3):
        text += f"\n[ad{i}]\nmodel = {base}\nlora = {root / f'ad{i}.gguf'}\n"
    p.write_text(text)
    return p


def router(quant, repack=True, extra=""):
    print(f"\n== router mode, {quant} base, repack {'on' if repack else 'off (--no-repack)'}")
    ini = preset(quant, extra + ("" if repack else "no-repack = true\n"))
    proc, url = start(["--models-preset", str(ini), "--models-max", "0"], root / f"router-{quant}-{repack}.log")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    answers = {}
    try:
        print(
            "  /v1/models before any request:",
            [(m["id"], m["status"]["value"]) for m in json.loads(req(url, "/v1/models")[1])["data"]],
        )
        for n, name in enumerate(NAMES):
            t = time.time()
            r = client.completions.create(
                model=name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"cache_prompt": False}
            )
            first = time.time() - t
            t = time.time()
            r2 = client.completions.create(
                model=name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"cache_prompt": False}
            )
            second = time.time() - t
            answers[name] = r.choices[0].text
            assert r2.choices[0].text == answers[name]
            print(f"  {name}: first request {first:.2f} s (instance start), second {second:.2f} s: {answers[name]!r}")
            if n in (1, 3):
                mem_report(f"memory, base + {n} adapter instance(s)", children(proc.pid))
        assert len(set(answers.values())) == 4, answers
        print(
            "  /v1/models after:",
            [(m["id"], m["status"]["value"]) for m in json.loads(req(url, "/v1/models")[1])["data"]],
        )
        return proc, url, answers
    except Exception:
        stop(proc)
        raise


def probe_router(url, proc):
    print("\n== router: unknown names, model management endpoints (with the API key)")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    for path, body in [
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/models/load", {"model": "/tmp/lora-scratch/router/base-f16.gguf"}),
        ("/models/load", {"model": "ad1"}),
        ("/models", {"model": "ggml-org/SmolLM2-135M-GGUF"}),
        ("/lora-adapters?model=ad1", [{"id": 0, "scale": 0.0}]),
    ]:
        print(f"  POST {path} {json.dumps(body)[:70]} -> {req(url, path, body)}")
    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as e:
        print(f"  openai client, unknown model: {type(e).__name__} status {e.status_code} body {e.body}")
    r = client.completions.create(model="ad1", prompt=PROMPT, max_tokens=12, temperature=0)
    print(f"  ad1 after POST /lora-adapters scale 0 by a key holder: {r.choices[0].text!r}")
    print("  GET /models?reload=1 ->", req(url, "/models?reload=1")[0])
    print("  DELETE /models?model=base ->", req(url, "/models?model=base", method="DELETE"))
    print("  POST /models/unload ad2 ->", req(url, "/models/unload", {"model": "ad2"}))
    time.sleep(2)
    print("  children after unload:", sorted(children(proc.pid)))
    print(
        "  without key:",
        req(url, "/v1/models", key="wrong")[0],
        req(url, "/models/unload", {"model": "ad3"}, key="wrong")[0],
    )


def single(quant, repack=True, speed=False):
    print(f"\n== one server, {quant} base, the 3 adapters as --lora-scaled FILE:0, repack {'on' if repack else 'off'}")
    args = ["-m", str(root / f"base-{quant}.gguf"), "-c", "1024", "-np", "3", "-t", "2"]
    args += [a for i in (1, 2, 3) for a in ("--lora-scaled", f"{root / f'ad{i}.gguf'}:0")]
    if not repack:
        args.append("--no-repack")
    proc, url = start(args, root / f"single-{quant}-{repack}.log")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    try:
        outs = {}
        for i, name in enumerate(NAMES):
            extra = {} if i == 0 else {"lora": [{"id": i - 1, "scale": 1.0}]}
            r = client.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra)
            outs[name] = r.choices[0].text
        mem_report("memory", {"single": proc.pid})

        def gen(i, n=32):
            extra = {} if i == 0 else {"lora": [{"id": i - 1, "scale": 1.0}]}
            r = client.completions.create(
                model="x", prompt=PROMPT, max_tokens=n, temperature=0, extra_body={**extra, "ignore_eos": True}
            )
            return r.usage.completion_tokens

        for label, ids in (
            []
            if not speed
            else [("1 client, ad1", [1]), ("3 clients, same adapter", [1, 1, 1]), ("3 clients, 3 adapters", [1, 2, 3])]
        ):
            t = time.time()
            with cf.ThreadPoolExecutor(len(ids)) as ex:
                toks = sum(ex.map(gen, ids))
            dt = time.time() - t
            print(f"  {label}: {toks} tokens in {dt:.2f} s = {toks / dt:.1f} tok/s")
        return outs
    finally:
        stop(proc)


def router_parallel(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)

    def gen(name, n=32):
        r = client.completions.create(
            model=name, prompt=PROMPT, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.usage.completion_tokens

    for label, names in [
        ("1 client, ad1", ["ad1"]),
        ("3 clients, same adapter", ["ad1"] * 3),
        ("3 clients, 3 adapters", ["ad1", "ad2", "ad3"]),
    ]:
        t = time.time()
        with cf.ThreadPoolExecutor(len(names)) as ex:
            toks = sum(ex.map(gen, names))
        dt = time.time() - t
        print(f"  router {label}: {toks} tokens in {dt:.2f} s = {toks / dt:.1f} tok/s")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "router":
        quant, repack = sys.argv[2], sys.argv[3] == "repack"
        proc, url, answers = router(quant, repack)
        if "probe" in sys.argv:
            probe_router(url, proc)
        if "speed" in sys.argv:
            router_parallel(url)
        stop(proc)
        outs = single(quant, repack, "speed" in sys.argv)
        print("  same answers as the router:", outs == answers)
    elif what == "startup":
        print("\n== router, load-on-startup = true in [*]")
        t = time.time()
        ini = preset("q4_k_m", "load-on-startup = true\nsleep-idle-seconds = 3\n")
        proc, url = start(["--models-preset", str(ini), "--models-max", "4"], root / "router-startup.log")
        print(
            f"  healthy after {time.time() - t:.2f} s; models:",
            [(m["id"], m["status"]["value"]) for m in json.loads(req(url, "/v1/models")[1])["data"]],
        )
        time.sleep(3)
        print("  3 s later:", [(m["id"], m["status"]["value"]) for m in json.loads(req(url, "/v1/models")[1])["data"]])
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
        t = time.time()
        client.completions.create(model="ad1", prompt=PROMPT, max_tokens=4, temperature=0)
        print(f"  first ad1 request after preload: {time.time() - t:.2f} s")
        time.sleep(8)
        print(
            "  8 s idle (sleep-idle-seconds = 3):",
            [(m["id"], m["status"]["value"]) for m in json.loads(req(url, "/v1/models")[1])["data"]],
        )
        mem_report("memory while sleeping", children(proc.pid))
        t = time.time()
        client.completions.create(model="ad1", prompt=PROMPT, max_tokens=4, temperature=0)
        print(f"  request to a sleeping instance: {time.time() - t:.2f} s")
        stop(proc)
