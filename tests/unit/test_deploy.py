"""The container and Kubernetes files agree with the server's behaviour (the schemas are CI's job)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_every_kind_the_issue_asks_for_is_there():
    assert {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(manifests())


def test_drain_timing_and_probes_match_the_server():
    dep = manifests()["Deployment"]["spec"]["template"]["spec"]
    (c,) = dep["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    grace = float(env["EMBEDSERVE_SHUTDOWN_GRACE"])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert dep["terminationGracePeriodSeconds"] > pre_stop + grace
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["securityContext"]["runAsNonRoot"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # HOME and caches live there
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_dockerfile_runs_the_server_as_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["embedserve", "serve"]' in text
    assert "USER 10001" in text and "EXPOSE 8000" in text
    assert "HEALTHCHECK" in text and "/health" in text
    assert "EMBEDSERVE_HOST=0.0.0.0" in text
    assert "AS cpu-base" in text and "AS cuda-base" in text


def test_models_come_from_a_cache_volume_or_are_baked_in_and_offline_is_not_forced():
    runtime = stages()["runtime"]
    hf_home = re.search(r"HF_HOME=(\S+)", runtime).group(1)
    # Baked in at build time: `--build-arg MODEL=...` downloads into HF_HOME and serves it offline; without it,
    # nothing is downloaded at build time and the Hub stays reachable (no forced offline mode).
    assert re.search(r'ARG MODEL=""', runtime) and 'embedserve download "$MODEL"' in runtime
    assert "HF_HUB_OFFLINE=${MODEL:+1}" in runtime and "HF_HUB_OFFLINE=1" not in runtime
    assert "EMBEDSERVE_MODEL=${MODEL}" in runtime
    assert f"chown 10001 {hf_home}" in runtime
    # Kubernetes: an init container downloads the server's model into the cache volume the server reads.
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    assert init["command"] == ["embedserve", "download"]
    model = {c["name"]: {e["name"]: e.get("value") for e in c["env"]}["EMBEDSERVE_MODEL"] for c in (init, server)}
    assert model[init["name"]] == model[server["name"]] and "/" in model[server["name"]]
    cache = [m for m in init["volumeMounts"] if m["mountPath"] == hf_home]
    assert cache and any(m["name"] == cache[0]["name"] and m["mountPath"] == hf_home for m in server["volumeMounts"])
    assert {e["name"]: e.get("value") for e in server["env"]}.get("HF_HUB_OFFLINE") == "1"


def stages() -> dict[str, str]:
    """Dockerfile stage name -> its instructions (comments dropped, continuation lines joined)."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out, name = {}, None
    for line in joined.splitlines():
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line)
        if m:
            name = m.group(2)
            out[name] = line + "\n"
        elif name:
            out[name] += line + "\n"
    return out


def test_the_cuda_image_can_compile_triton_and_pins_a_torch_with_what_flash_varlen_needs():
    s = stages()
    cuda, cpu, runtime = s["cuda-base"], s["cpu-base"], s["runtime"]
    # Triton builds its C launcher at the first kernel launch: a compiler, libc headers, Python's headers.
    installed = re.search(r"apt-get install (.*)", cuda).group(1).split()
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(installed)
    # A torch whose varlen_attn takes scale, windows and GQA (>= 2.12), on the CUDA base its wheels are built for.
    torch_pin = re.search(r"pip install --no-cache-dir -c \S+ torch==(\d+)\.(\d+)\.\d+", cuda)
    assert torch_pin and (int(torch_pin.group(1)), int(torch_pin.group(2))) >= (2, 12)
    base = re.match(r"FROM nvidia/cuda:\$\{CUDA\}\.\d+-(\w+)-ubuntu", cuda)
    text = (ROOT / "Dockerfile").read_text()
    assert base and "ARG CUDA=13.0" in text  # by default: PyPI's torch 2.13.0 is the CUDA 13.0 build
    assert base.group(1) == "base"  # not runtime/cudnn-runtime: the torch wheels bundle cuBLAS and cuDNN
    # A GPU that is not visible fails at start-up in the CUDA image; the CPU image serves on the CPU.
    assert "EMBEDSERVE_DEVICE=cuda" in cuda and "EMBEDSERVE_DEVICE=cuda" not in cpu + runtime
    assert "EMBEDSERVE_DEVICE=cpu" in cpu
    # Triton's cache is a path the non-root user can write (HOME and caches under /tmp).
    assert re.search(r"TRITON_CACHE_DIR=/tmp/", runtime) and "USER 10001" in runtime


def test_the_manifests_fail_closed():
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    key = next(e for e in c["env"] if e["name"] == "EMBEDSERVE_API_KEY")["valueFrom"]["secretKeyRef"]
    assert not key.get("optional", False)  # no secret, no pod: never a pod that answers anyone
    assert pod["automountServiceAccountToken"] is False
    assert all("limits" in i["resources"] and "requests" in i["resources"] for i in pod["initContainers"])
    ready = c["readinessProbe"]
    assert ready["failureThreshold"] >= 2 and ready["timeoutSeconds"] >= 2  # one slow answer is not an outage
    ingress = docs["Ingress"]
    hosts = {r["host"] for r in ingress["spec"]["rules"]}
    assert hosts <= {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    from embedserve.config import ServerConfig

    limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(limit.removesuffix("m")) * 1024 * 1024 == ServerConfig().max_body_bytes


def test_a_network_policy_admits_only_the_ingress_and_the_scraper_on_the_http_port():
    docs = manifests()
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert all(set(peer) == {"namespaceSelector"} for peer in rule["from"])
    assert len(rule["from"]) == 2


def test_the_cuda_image_builds_for_cuda_13_and_12_6_through_the_lock():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG CUDA=13.0" in text and "FROM nvidia/cuda:${CUDA}.2-base-ubuntu24.04 AS cuda-base" in text
    install = text[text.index('RUN if [ "$CUDA" = "13.0" ]'):]
    install = install[: install.index("\n# ")]
    assert install.count("-c /tmp/src/constraints.txt torch==2.13.0") == 2  # both through the lock
    assert "https://download.pytorch.org/whl/cu126" in install and "exit 1" in install
    readme = (ROOT / "README.md").read_text()
    assert "| `12.6` |" in readme and "580 or newer" in readme
