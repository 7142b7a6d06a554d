"""The deploy's own rules, checked on rendered manifests (scripts/test-deploy, section 2).

Usage: policy.py RENDERED.yaml...  (run from the repository root, with the deploy venv's Python:
PyYAML comes with yamllint). Reads config/production.toml for the ports, the mounts and the drain
time the manifests must agree with; prints one line per broken rule and exits 1 if there is any.
"""
import re, sys
try:
    import tomllib
except ImportError:  # Python < 3.11: install-deploy-tools adds tomli
    import tomli as tomllib
import yaml  # PyYAML, from yamllint's venv

def dur(s):
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", s):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total

with open("config/production.toml", "rb") as f:
    prod = tomllib.load(f)
port = lambda addr: int(addr.rsplit(":", 1)[1])
grpc_port = port(prod["server"]["listen"])
probe_port = port(prod["probe"]["listen"])
drain = dur(prod["shutdown"].get("delay", "0s")) + dur(prod["shutdown"]["grace"])
dirs = {
    "/etc/greeter/config": "config",
    prod["tls"]["cert"].rsplit("/", 1)[0]: "tls",
    prod["tls"]["key"].rsplit("/", 1)[0]: "tls",
    prod["auth"]["tokens_file"].rsplit("/", 1)[0]: "tokens",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume", "IngressClass",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
errors = []
def need(cond, msg):
    if not cond:
        errors.append(msg)

for path in sys.argv[1:]:
    name = path.rsplit("/", 1)[1].removesuffix(".yaml")
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by = {}
    for d in docs:
        by.setdefault(d["kind"], []).append(d)
        for k, v in (d["metadata"].get("annotations") or {}).items():
            if k.startswith("checkov.io/skip"):
                m = re.fullmatch(r"(CKV2?_[A-Z0-9_]+)=(.+)", v.strip(), re.S)
                need(m and len(m.group(2).split()) >= 5,
                     f"{name}: {d['kind']}/{d['metadata']['name']}: checkov skip without a reason: {v!r}")
    w = lambda m: errors.append(f"{name}: {m}")
    # Every namespaced object lands in the overlay's namespace, including what a component adds.
    namespaces = [d["metadata"]["name"] for d in by.get("Namespace", [])]
    need(len(namespaces) == 1, f"{name}: want one Namespace, got {namespaces}")
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") not in namespaces[:1]:
            w(f"{d['kind']}/{d['metadata']['name']} in namespace {d['metadata'].get('namespace')!r}, "
              f"not the overlay's {namespaces[:1]}")
    for kind in ["Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "NetworkPolicy"]:
        need(kind in by, f"{name}: no {kind}")
    if "Deployment" not in by:
        continue
    dep = by["Deployment"][0]
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    if name == "dev":
        need(spec["replicas"] == 1, f"{name}: replicas {spec['replicas']}, want 1")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        need(env.get("GREETER__LOG__FILTER") == "debug", f"{name}: GREETER__LOG__FILTER=debug not set")
        need("HorizontalPodAutoscaler" not in by, f"{name}: an HPA would scale the single replica up")
    else:
        need(spec["replicas"] >= 2, f"{name}: replicas {spec['replicas']} < 2")
        need("HorizontalPodAutoscaler" in by and by["HorizontalPodAutoscaler"][0]["spec"]["minReplicas"] >= 2,
             f"{name}: no HPA with minReplicas >= 2")
        need("PodDisruptionBudget" in by, f"{name}: no PodDisruptionBudget")
    ru = spec["strategy"].get("rollingUpdate", {})
    need(spec["strategy"]["type"] == "RollingUpdate" and ru.get("maxUnavailable") == 0,
         f"{name}: rollout must be RollingUpdate with maxUnavailable 0")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    need(grace > drain, f"{name}: terminationGracePeriodSeconds {grace} <= shutdown.delay + shutdown.grace ({drain:g}s)")
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        p = c.get(probe) or {}
        need(p.get("grpc", {}).get("port") == probe_port,
             f"{name}: {probe} is not a native grpc probe on the probe port {probe_port}")
    lp = c.get("livenessProbe") or {}
    need(lp.get("periodSeconds", 10) * lp.get("failureThreshold", 3) > drain,
         f"{name}: liveness would fail during the drain ({drain:g}s)")
    cports = {p["containerPort"] for p in c["ports"]}
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    need(named.get("grpc") == grpc_port and named.get("probe") == probe_port,
         f"{name}: container ports grpc/probe {named} differ from production.toml ({grpc_port}, {probe_port})")
    if "metrics" in prod and "listen" in prod["metrics"]:
        need(named.get("metrics") == port(prod["metrics"]["listen"]),
             f"{name}: container port metrics {named.get('metrics')} differs from production.toml")
    need({grpc_port, probe_port, 9090} <= cports, f"{name}: container ports {sorted(cports)}")
    for r in ["requests", "limits"]:
        need({"cpu", "memory"} <= set(c.get("resources", {}).get(r, {})), f"{name}: resources.{r} incomplete")
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    need(sc.get("runAsNonRoot") or psc.get("runAsNonRoot"), f"{name}: runAsNonRoot")
    need(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem")
    need(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation")
    need(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities drop ALL")
    need((sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
         f"{name}: seccomp RuntimeDefault")
    need(pod.get("automountServiceAccountToken") is False, f"{name}: pod mounts a service account token")
    need(all(sa.get("automountServiceAccountToken") is False for sa in by.get("ServiceAccount", [])),
         f"{name}: ServiceAccount automounts its token")
    need(len(pod.get("topologySpreadConstraints", [])) >= 1, f"{name}: no topology spread")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    for d, vol in dirs.items():
        m = mounts.get(d)
        need(m is not None and m.get("readOnly") and "subPath" not in m and m["name"] == vol,
             f"{name}: {d} must be a read-only directory mount (no subPath) of volume {vol}")
    need(vols.get("tls", {}).get("secret", {}).get("secretName") == "greeter-tls", f"{name}: tls volume")
    need(vols.get("tokens", {}).get("secret", {}).get("secretName") == "greeter-tokens", f"{name}: tokens volume")
    cm = vols.get("config", {}).get("configMap", {}).get("name", "")
    cms = [d for d in by.get("ConfigMap", []) if d["metadata"]["name"] == cm]
    need(cms and cms[0]["data"].get("production.toml") == open("config/production.toml").read(),
         f"{name}: the mounted ConfigMap does not hold config/production.toml")
    svcs = {s["metadata"]["name"]: s["spec"] for s in by.get("Service", [])}
    need(any(s.get("clusterIP") == "None" for s in svcs.values()), f"{name}: no headless Service")
    need(any(s.get("type", "ClusterIP") == "ClusterIP" and s.get("clusterIP") != "None" for s in svcs.values()),
         f"{name}: no ClusterIP Service")
    np = by["NetworkPolicy"][0]["spec"]
    np_ports = {p["port"] for r in np.get("ingress", []) for p in r.get("ports", [])}
    need({"grpc", "probe", "metrics"} <= np_ports, f"{name}: NetworkPolicy ingress ports {np_ports}")
    need("Egress" in np.get("policyTypes", []), f"{name}: NetworkPolicy leaves egress open")

for e in errors:
    print(e)
sys.exit(1 if errors else 0)
