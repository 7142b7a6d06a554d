"""Every Deployment's memory limit must hold the worst case its config allows.

Usage: memory.py GREETER_BINARY WORK_DIR RENDERED.yaml...  (scripts/test-deploy, section 2).
Runs `greeter config check` on the ConfigMap each rendered Deployment mounts, with the
Deployment's GREETER__* environment and dev certificates standing in for the Secrets, and compares
the printed worst case with the container's memory limit: a limit below it is one clients can push
the pod past, to an OOM kill. Prints the figures; exits 1 if any limit is below its worst case.
"""
import os, pathlib, re, subprocess, sys
import yaml  # PyYAML, from yamllint's venv

binary, work, *paths = sys.argv[1:]
work = pathlib.Path(work)
work.mkdir(parents=True, exist_ok=True)
run = lambda *args, **kw: subprocess.run([binary, *args], capture_output=True, text=True, **kw)
# config check loads the TLS and token files: dev ones stand in for the Secrets.
run("certs", "generate", "--out", str(work / "certs"), "--host", "localhost", "--force", check=True)
(work / "tokens.toml").unlink(missing_ok=True)
run("token", "new", "--name", "memory", "--scope", "greeter", "--append", str(work / "tokens.toml"), check=True)
UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
failed = False
figures = []
for path in paths:
    name = path.rsplit("/", 1)[1].removesuffix(".yaml")
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    m = re.fullmatch(r"(\d+)(k|M|G|Ki|Mi|Gi|)", str(c["resources"]["limits"]["memory"]))
    limit = int(m.group(1)) * UNITS[m.group(2)]
    cm = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "config")
    data = next(d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm)
    config = work / f"{name}.toml"
    config.write_text(data["production.toml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREETER__")}
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    env.update(GREETER__TLS__CERT=str(work / "certs/server.pem"), GREETER__TLS__KEY=str(work / "certs/server.key"),
               GREETER__AUTH__TOKENS_FILE=str(work / "tokens.toml"))
    out = run("config", "check", "--config", str(config), env=env)
    found = re.search(r"worst-case memory: (\d+) MiB", out.stdout)
    if out.returncode != 0 or not found:
        print(f"{name}: greeter config check failed: {out.stdout}{out.stderr}")
        failed = True
        continue
    worst = int(found.group(1)) << 20
    verdict = "holds" if limit >= worst else "is BELOW"
    figures.append(f"{name}: limit {limit >> 20} MiB {verdict} the worst case {worst >> 20} MiB")
    failed |= limit < worst
print("; ".join(figures))
sys.exit(1 if failed else 0)
