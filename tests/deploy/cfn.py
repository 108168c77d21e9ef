"""The ECS template (deploy/ecs/ci-runner.yaml), loaded and resolved for the tests.

    python3 tests/deploy/cfn.py stack Scope=octo-org/octo-repo [Key=Value ...]

creates the stack in moto's CloudFormation (in process) and prints, as JSON, what a scaler and
an ECS agent would see of it: the runner container's environment and secrets as moto resolved
them, and the scaling policy's metric as this module's own resolver reads it from the template
(moto's CloudFormation has no AWS::ApplicationAutoScaling types). The Rust test
tests/integration/deploy.rs runs the real binary with that environment and compares what it
publishes with that metric.
"""
import json
import os
import sys

import cfnlint.decode.cfn_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = os.path.join(ROOT, "deploy", "ecs", "ci-runner.yaml")
REGION = "us-east-1"
ACCOUNT = "123456789012"
STACK = "ci-test"
NO_VALUE = object()
# moto's fake account; and never a look for real credentials on this machine.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_k, _v)


def load():
    """The template with short-form tags (!Ref) turned into the long form (Ref)."""
    return cfnlint.decode.cfn_yaml.load(TEMPLATE)


def parameters(template, given):
    """Every parameter's value: the given ones over the defaults, as strings (as CloudFormation
    passes them). A required parameter left out is an error."""
    out = {}
    for name, spec in template["Parameters"].items():
        if name in given:
            out[name] = str(given[name])
        elif "Default" in spec:
            out[name] = str(spec["Default"])
        else:
            raise KeyError(f"parameter {name} has no default and was not given")
    return out


class Resolver:
    """Enough of CloudFormation's intrinsic functions for this template: Ref, Fn::Sub,
    Fn::FindInMap, Fn::If with Fn::Equals/Fn::Not conditions, Fn::GetAtt (to "Logical.Attr")."""

    def __init__(self, template, params):
        self.t = template
        self.p = dict(params)
        self.p.update({
            "AWS::Region": REGION, "AWS::AccountId": ACCOUNT, "AWS::StackName": STACK,
            "AWS::Partition": "aws",
        })

    def condition(self, name_or_expr):
        expr = self.t["Conditions"][name_or_expr] if isinstance(name_or_expr, str) else name_or_expr
        (fn, args), = expr.items()
        if fn == "Fn::Not":
            return not self.condition(args[0])
        if fn == "Fn::Equals":
            a, b = (self.value(x) for x in args)
            return a == b
        if fn == "Condition":
            return self.condition(args)
        raise ValueError(f"condition function {fn} not handled")

    def value(self, v):
        if isinstance(v, list):
            return [x for x in (self.value(e) for e in v) if x is not NO_VALUE]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            (k, a), = v.items()
            if k == "Ref":
                if a == "AWS::NoValue":
                    return NO_VALUE
                return self.p.get(a, a)  # a resource: its logical id stands for it
            if k == "Fn::Sub":
                s = a if isinstance(a, str) else a[0]
                extra = {} if isinstance(a, str) else {n: self.value(x) for n, x in a[1].items()}
                out, i = "", 0
                while i < len(s):
                    j = s.find("${", i)
                    if j < 0:
                        out += s[i:]
                        break
                    e = s.index("}", j)
                    name = s[j + 2:e]
                    out += s[i:j] + str(extra.get(name, self.p.get(name, name)))
                    i = e + 1
                return out
            if k == "Fn::FindInMap":
                m, top, second = (self.value(x) for x in a)
                return self.t["Mappings"][m][top][second]
            if k == "Fn::If":
                return self.value(a[1] if self.condition(a[0]) else a[2])
            if k == "Fn::GetAtt":
                return ".".join(a) if isinstance(a, list) else a
        return {k: x for k, x in ((k, self.value(x)) for k, x in v.items()) if x is not NO_VALUE}


def resolved(given, typed=False):
    """The template's resources with the intrinsics resolved for these parameters. `typed`:
    Number parameters as numbers, as the resource types' schemas expect them after
    CloudFormation's conversion (a Ref itself gives a string)."""
    t = load()
    params = parameters(t, given)
    if typed:
        for name, spec in t["Parameters"].items():
            if spec["Type"] == "Number":
                params[name] = float(params[name]) if "." in params[name] else int(params[name])
    r = Resolver(t, params)
    return {name: r.value(res) for name, res in t["Resources"].items()}


def create_stack(given):
    """Creates the stack in moto (which must be mocked by the caller) and returns the boto3
    clients' view: the stack's resources and the task definition."""
    import boto3

    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{az}")["Subnet"]["SubnetId"]
        for i, az in enumerate("ab", start=1)
    ]
    secret = boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name="ci-runner/GH_TOKEN", SecretString="ghp_not_a_real_token"
    )["ARN"]
    params = {"Image": "ghcr.io/octo-org/ci-runner:v0.1.0", "Labels": "linux,ecs",
              "GitHubTokenSecretArn": secret, "VpcId": vpc, "Subnets": ",".join(subnets)}
    params.update(given)
    cf = boto3.client("cloudformation", region_name=REGION)
    with open(TEMPLATE) as f:
        body = f.read()
    cf.create_stack(
        StackName=STACK, TemplateBody=body, Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": str(v)} for k, v in params.items()],
    )
    stack = cf.describe_stacks(StackName=STACK)["Stacks"][0]
    resources = cf.list_stack_resources(StackName=STACK)["StackResourceSummaries"]
    ecs = boto3.client("ecs", region_name=REGION)
    task = ecs.describe_task_definition(taskDefinition=STACK)["taskDefinition"]
    return {"params": params, "stack": stack, "resources": resources, "task": task}


def container(task):
    """The runner container, with moto's leftovers of AWS::NoValue (None in lists) dropped and
    values as strings (CloudFormation passes a Number parameter as a string; moto keeps it a
    number)."""
    (c,) = task["containerDefinitions"]
    c = dict(c)
    c["environment"] = [{"name": e["name"], "value": str(e["value"])} for e in c["environment"] if e]
    c["secrets"] = [s for s in c["secrets"] if s]
    return c


def main():
    if len(sys.argv) < 2 or sys.argv[1] != "stack":
        sys.exit(__doc__)
    given = dict(a.split("=", 1) for a in sys.argv[2:])
    from moto import mock_aws

    with mock_aws():
        made = create_stack(given)
    c = container(made["task"])
    policy = resolved(made["params"])["ScalingPolicy"]["Properties"]
    json.dump({
        "status": made["stack"]["StackStatus"],
        "environment": {e["name"]: e["value"] for e in c["environment"]},
        "secrets": c["secrets"],
        "metric": policy["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"],
    }, sys.stdout)


if __name__ == "__main__":
    main()
