"""The container and Kubernetes files agree with the server's behaviour (the schemas are CI's job)."""

from __future__ import annotations

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
    assert "EMBEDSERVE_HOST=0.0.0.0" in text and "HF_HUB_OFFLINE=1" in text
    assert "AS cpu-base" in text and "AS cuda-base" in text
