"""deploy/ecs/ci-runner.yaml: created in moto's CloudFormation, the resources moto lacks checked
against CloudFormation's own resource schemas (those cfn-lint ships), and the settings that
must agree with the binary (shutdown budget, secrets, the task role, the scaling metric).

Run: python3 -m unittest discover -s tests/deploy -v
"""
import os
import re
import unittest

import jsonschema
import regex
from moto import mock_aws

import cfn

ROOT = cfn.ROOT
# What moto's CloudFormation cannot create (moto 5.2); their properties are checked against
# the provider schemas instead. If moto learns one, it moves to the created set.
MOTO_LACKS = {
    "AWS::ECS::CapacityProvider",
    "AWS::ECS::ClusterCapacityProviderAssociations",
    "AWS::ApplicationAutoScaling::ScalableTarget",
    "AWS::ApplicationAutoScaling::ScalingPolicy",
}
SECRET_VARS = {
    "GH_TOKEN", "GH_RUNNER_TOKEN", "GH_APP_PRIVATE_KEY", "CI_STORAGE_PRIVATE_KEY", "ADMIN_TOKEN",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
}


def _pattern(validator, pattern, instance, schema):
    # The resource schemas use \p{…} classes, which only the regex module knows.
    if isinstance(instance, str) and not regex.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


SchemaValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": _pattern})


def policy_doc(iam, role, name):
    """An inline policy's document: boto3 decodes AWS's URL-encoded JSON, but moto keeps a
    policy made by its CloudFormation as the text of a Python dict."""
    import ast

    doc = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
    return ast.literal_eval(doc) if isinstance(doc, str) else doc


def drain_budget_extra():
    """The seconds the README's worst case adds to DRAIN_TIMEOUT_SEC ("Shutdown sequence and
    time budgets"): `DRAIN_TIMEOUT_SEC + 30 s + 20 s + 10 s + 3.5 s`."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    m = re.search(r"Worst case: `DRAIN_TIMEOUT_SEC((?: \+ [0-9.]+ s)+)`", readme)
    assert m, "README.md lost its 'Worst case: `DRAIN_TIMEOUT_SEC + … s`' line"
    return sum(float(x) for x in re.findall(r"[0-9.]+", m.group(1)))


def default_dimension_of_scope():
    """The dimension name src/config.rs publishes under for each scope kind when
    CLOUDWATCH_DIMENSIONS is unset."""
    with open(os.path.join(ROOT, "src", "config.rs")) as f:
        src = f.read()
    found = dict(re.findall(r'Scope::(\w+)\b[^=\n]*=> (?:vec!\[\(|Some\(\()"(GH_\w+)"', src))
    assert set(found) == {"Repository", "Organization", "Enterprise"}, found
    return {k.lower(): v for k, v in found.items()}


class EcsStack(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.template = cfn.load()
        cls.mock = mock_aws()
        cls.mock.start()
        cls.made = cfn.create_stack({"Scope": "octo-org/octo-repo"})
        cls.container = cfn.container(cls.made["task"])
        cls.env = {e["name"]: e["value"] for e in cls.container["environment"]}

    @classmethod
    def tearDownClass(cls):
        cls.mock.stop()

    def physical(self, logical):
        (r,) = [r for r in self.made["resources"] if r["LogicalResourceId"] == logical]
        return r["PhysicalResourceId"]

    def test_stack_is_created_in_moto_with_every_resource_it_supports(self):
        self.assertEqual(self.made["stack"]["StackStatus"], "CREATE_COMPLETE")
        created = {r["LogicalResourceId"]: r["ResourceType"] for r in self.made["resources"] if r["LogicalResourceId"]}
        declared = {n: r["Type"] for n, r in self.template["Resources"].items()}
        missing = {n: t for n, t in declared.items() if n not in created}
        # Never: a resource type moto supports left out of the stack without this test noticing.
        self.assertEqual(set(missing.values()), MOTO_LACKS, f"not created by moto: {missing}")

    def test_resources_moto_lacks_match_their_cloudformation_schemas(self):
        from cfnlint.schema import PROVIDER_SCHEMA_MANAGER

        resources = cfn.resolved(self.made["params"], typed=True)
        for name, res in resources.items():
            if res["Type"] not in MOTO_LACKS:
                continue
            schema = PROVIDER_SCHEMA_MANAGER.get_resource_schema(cfn.REGION, res["Type"]).schema
            errors = [e.message for e in SchemaValidator(schema).iter_errors(res["Properties"])]
            self.assertEqual(errors, [], f"{name} ({res['Type']})")
        # And the check can fail: a misspelt property is refused.
        bad = dict(resources["ScalingPolicy"]["Properties"], PolicyTyp="TargetTrackingScaling")
        schema = PROVIDER_SCHEMA_MANAGER.get_resource_schema(cfn.REGION, "AWS::ApplicationAutoScaling::ScalingPolicy").schema
        self.assertTrue(list(SchemaValidator(schema).iter_errors(bad)))

    def test_stop_timeout_covers_the_worst_case_drain(self):
        stop = self.container["stopTimeout"]
        self.assertLessEqual(stop, 120, "ECS caps stopTimeout at 120 s")
        drain_max = self.template["Parameters"]["DrainTimeoutSec"]["MaxValue"]
        # Never: a DRAIN_TIMEOUT_SEC the template accepts whose drain ECS would cut with SIGKILL.
        self.assertLessEqual(drain_max + drain_budget_extra(), stop)
        self.assertLessEqual(int(self.env["DRAIN_TIMEOUT_SEC"]), drain_max)
        self.assertEqual(drain_budget_extra(), 63.5)

    def test_secrets_come_from_secrets_manager_or_ssm_never_plain_environment(self):
        names = {s["name"] for s in self.container["secrets"]}
        self.assertIn("GH_TOKEN", names)
        for s in self.container["secrets"]:
            self.assertRegex(s["valueFrom"], r"^arn:aws:(secretsmanager|ssm):")
        # Never: a secret variable in the task definition's plain environment.
        self.assertEqual(SECRET_VARS & set(self.env), set())
        # The execution role may read exactly those secrets.
        import boto3

        role = self.physical("ExecutionRole")
        iam = boto3.client("iam", region_name=cfn.REGION)
        doc = policy_doc(iam, role, "read-runner-secrets")
        (stmt,) = doc["Statement"]
        resources = [r for r in stmt["Resource"] if r]
        self.assertEqual(resources, [s["valueFrom"] for s in self.container["secrets"]])

    def test_task_runs_ci_runner_as_pid_1_with_health_check_and_logs(self):
        c = self.container
        self.assertNotIn("entryPoint", {k for k, v in c.items() if v})
        self.assertNotIn("command", {k for k, v in c.items() if v})
        self.assertFalse((c.get("linuxParameters") or {}).get("initProcessEnabled", False))
        self.assertEqual(c["healthCheck"]["command"], ["CMD", "/usr/local/bin/ci-runner", "status"])
        self.assertEqual(c["logConfiguration"]["logDriver"], "awslogs")
        self.assertEqual(self.env["CLOUDWATCH_ENABLED"], "true")

    def test_task_role_allows_exactly_put_metric_data_in_its_namespace_and_task_protection(self):
        import boto3

        iam = boto3.client("iam", region_name=cfn.REGION)
        role = self.physical("TaskRole")
        self.assertEqual(iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"], [])
        names = iam.list_role_policies(RoleName=role)["PolicyNames"]
        statements = [s for n in names for s in policy_doc(iam, role, n)["Statement"]]
        actions = sorted(a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
        # Never: any other permission on the role every job's container holds.
        self.assertEqual(actions, ["cloudwatch:PutMetricData", "ecs:UpdateTaskProtection"])
        for s in statements:
            self.assertEqual(s["Effect"], "Allow")
            if s["Action"] == "cloudwatch:PutMetricData":
                self.assertEqual(s["Condition"], {"StringEquals": {"cloudwatch:namespace": self.env["CLOUDWATCH_NAMESPACE"]}})
            else:
                self.assertEqual(s["Resource"], "arn:aws:ecs:us-east-1:123456789012:task/ci-test/*")

    def test_scaling_policy_tracks_the_metric_the_task_publishes_for_every_scope(self):
        dims = default_dimension_of_scope()
        for kind, scope in [("repository", "octo-org/octo-repo"), ("organization", "octo-org"), ("enterprise", "octo-corp")]:
            params = dict(self.made["params"], ScopeType=kind, Scope=scope)
            r = cfn.resolved(params)
            cfg = r["ScalingPolicy"]["Properties"]["TargetTrackingScalingPolicyConfiguration"]
            m = cfg["CustomizedMetricSpecification"]
            env = {e["Name"]: e["Value"] for e in r["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]["Environment"]}
            self.assertEqual(m["MetricName"], "ActiveRunnersPercent")
            self.assertEqual(m["Statistic"], "Average")
            self.assertEqual(m["Namespace"], env["CLOUDWATCH_NAMESPACE"])
            self.assertNotIn("CLOUDWATCH_DIMENSIONS", env)
            self.assertNotIn("CLOUDWATCH_METRIC_NAME", env)
            # The scope's variable is set, and the binary's default dimension for it is the policy's.
            self.assertEqual(env[dims[kind]], scope, kind)
            self.assertEqual(m["Dimensions"], [{"Name": dims[kind], "Value": scope}], kind)
            self.assertEqual(cfg["TargetValue"], "70")
            self.assertEqual((cfg["ScaleOutCooldown"], cfg["ScaleInCooldown"]), ("60", "300"))
        target = cfn.resolved(self.made["params"])["ScalableTarget"]["Properties"]
        self.assertEqual(target["ResourceId"], "service/Cluster/Service.Name")
        td = cfn.resolved(self.made["params"])["TaskDefinition"]["Properties"]
        self.assertEqual((td["TaskRoleArn"], td["ExecutionRoleArn"]), ("TaskRole.Arn", "ExecutionRole.Arn"))
        self.assertEqual(target["ScalableDimension"], "ecs:service:DesiredCount")
        # Never below one task: with none, nothing publishes and target tracking cannot scale out.
        self.assertGreaterEqual(self.template["Parameters"]["MinTasks"]["MinValue"], 1)

    def test_instances_are_spot_behind_a_managed_capacity_provider(self):
        r = cfn.resolved(self.made["params"])
        asg = r["AutoScalingGroup"]["Properties"]
        dist = asg["MixedInstancesPolicy"]["InstancesDistribution"]
        self.assertEqual((dist["OnDemandBaseCapacity"], dist["OnDemandPercentageAboveBaseCapacity"]), (0, 0))
        self.assertEqual(len(asg["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]), 3)
        self.assertTrue(asg["NewInstancesProtectedFromScaleIn"])
        cp = r["CapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
        self.assertEqual(cp["ManagedScaling"]["Status"], "ENABLED")
        self.assertEqual(cp["ManagedTerminationProtection"], "ENABLED")
        self.assertEqual(r["Service"]["Properties"]["CapacityProviderStrategy"][0]["CapacityProvider"], "CapacityProvider")
        # Containers cannot reach the instance metadata (and so the instance role).
        md = r["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
        self.assertEqual((md["HttpTokens"], md["HttpPutResponseHopLimit"]), ("required", 1))
        self.assertIn("ECS_ENABLE_SPOT_INSTANCE_DRAINING=true", r["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"])
        # An empty second type is left out.
        r2 = cfn.resolved(dict(self.made["params"], InstanceType2=""))
        self.assertEqual(len(r2["AutoScalingGroup"]["Properties"]["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]), 2)


if __name__ == "__main__":
    unittest.main()
