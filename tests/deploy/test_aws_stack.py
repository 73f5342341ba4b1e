"""The AWS stack (ops/aws), synthesised once and checked as CloudFormation.

What production promises: no database on the internet, every store encrypted at rest and
in transit, TLS from clients to the load balancer, task roles that read only their own
secrets, and a health check and a log group for every process. Synthesis needs Node.js
(the CDK's bundled runtime), neither AWS credentials nor Docker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

cdk = pytest.importorskip("aws_cdk")
if shutil.which("node") is None:
    pytest.skip("the CDK's runtime needs Node.js", allow_module_level=True)

from aws_cdk.assertions import Match, Template  # noqa: E402

from ops.aws import services as table  # noqa: E402
from ops.aws.app import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CERTIFICATE = "arn:aws:acm:eu-west-1:111111111111:certificate/test-certificate"


@pytest.fixture(scope="module")
def template() -> Template:
    app = cdk.App(context={"certificate_arn": CERTIFICATE})
    return Template.from_stack(build(app))


@pytest.fixture(scope="module")
def resources(template: Template) -> dict[str, dict[str, Any]]:
    return template.to_json()["Resources"]


def of_type(resources: dict[str, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in resources.items() if v["Type"] == kind}


def ref(value: Any) -> str:
    """The logical id a `Ref` or `Fn::GetAtt` points at."""
    if isinstance(value, dict) and "Ref" in value:
        return str(value["Ref"])
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return str(value["Fn::GetAtt"][0])
    raise AssertionError(f"not a reference: {value!r}")


def subnet_type(resources: dict[str, dict[str, Any]], subnet: Any) -> str:
    tags = {t["Key"]: t["Value"] for t in resources[ref(subnet)]["Properties"]["Tags"]}
    return tags["aws-cdk:subnet-type"]


def task_of(resources: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    services = of_type(resources, "AWS::ECS::Service")
    (service,) = [s for s in services.values() if s["Properties"]["ServiceName"] == name]
    return resources[ref(service["Properties"]["TaskDefinition"])]["Properties"]


def secrets_read_by(resources: dict[str, dict[str, Any]], role_id: str) -> set[str]:
    """The logical ids of the secrets a role may read (from the policies attached to it)."""
    read = set()
    for policy in of_type(resources, "AWS::IAM::Policy").values():
        if role_id not in [ref(r) for r in policy["Properties"].get("Roles", [])]:
            continue
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            actions = statement["Action"]
            actions = [actions] if isinstance(actions, str) else actions
            if any(a.startswith("secretsmanager:") for a in actions):
                targets = statement["Resource"]
                targets = targets if isinstance(targets, list) else [targets]
                read |= {ref(t) for t in targets}
    return read


def secret_id(resources: dict[str, dict[str, Any]], name: str) -> str:
    """The logical id through which tasks read the secret called `name`."""
    (key,) = [
        k
        for k, v in of_type(resources, "AWS::SecretsManager::Secret").items()
        if v["Properties"].get("Name") == name
    ]
    attachments = [
        k
        for k, v in of_type(resources, "AWS::SecretsManager::SecretTargetAttachment").items()
        if ref(v["Properties"]["SecretId"]) == key
    ]
    return attachments[0] if attachments else key


def test_the_database_is_private_encrypted_and_backed_up(resources):
    (database,) = of_type(resources, "AWS::RDS::DBInstance").values()
    props = database["Properties"]
    assert props["PubliclyAccessible"] is False
    assert props["StorageEncrypted"] is True
    assert props["BackupRetentionPeriod"] >= 7
    assert props["DeletionProtection"] is True
    group = resources[ref(props["DBSubnetGroupName"])]["Properties"]
    assert {subnet_type(resources, s) for s in group["SubnetIds"]} == {"Isolated"}
    # Its credentials are generated into Secrets Manager, not written into the template.
    assert "{{resolve:secretsmanager:" in json.dumps(props["MasterUserPassword"])


def test_kafka_encrypts_at_rest_and_in_transit_and_authenticates(resources):
    (cluster,) = of_type(resources, "AWS::MSK::Cluster").values()
    props = cluster["Properties"]
    encryption = props["EncryptionInfo"]
    assert encryption["EncryptionAtRest"]["DataVolumeKMSKeyId"]
    assert encryption["EncryptionInTransit"] == {"ClientBroker": "TLS", "InCluster": True}
    assert props["ClientAuthentication"]["Sasl"]["Scram"]["Enabled"] is True
    assert props["ClientAuthentication"]["Unauthenticated"]["Enabled"] is False
    subnets = props["BrokerNodeGroupInfo"]["ClientSubnets"]
    assert {subnet_type(resources, s) for s in subnets} == {"Isolated"}


def test_kafka_brokers_default_to_replicated_topics(resources):
    (configuration,) = of_type(resources, "AWS::MSK::Configuration").values()
    lines = set(configuration["Properties"]["ServerProperties"].splitlines())
    assert {"auto.create.topics.enable=false", "min.insync.replicas=2"} <= lines
    assert "default.replication.factor=3" in lines


def test_redis_encrypts_at_rest_and_in_transit_with_a_token_from_secrets_manager(resources):
    (redis,) = of_type(resources, "AWS::ElastiCache::ReplicationGroup").values()
    props = redis["Properties"]
    assert props["AtRestEncryptionEnabled"] is True
    assert props["TransitEncryptionEnabled"] is True
    assert "{{resolve:secretsmanager:" in json.dumps(props["AuthToken"])


def test_clients_reach_the_load_balancer_over_tls_only(resources):
    balancers = of_type(resources, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    public = {k for k, v in balancers.items() if v["Properties"]["Scheme"] == "internet-facing"}
    assert len(public) == 1
    listeners = [
        v["Properties"]
        for v in of_type(resources, "AWS::ElasticLoadBalancingV2::Listener").values()
        if ref(v["Properties"]["LoadBalancerArn"]) in public
    ]
    https = [ln for ln in listeners if ln["Protocol"] == "HTTPS"]
    assert [ln["Port"] for ln in https] == [443]
    assert https[0]["Certificates"] == [{"CertificateArn": CERTIFICATE}]
    assert https[0]["SslPolicy"].startswith("ELBSecurityPolicy-TLS13")
    plain = [ln for ln in listeners if ln["Protocol"] != "HTTPS"]
    assert plain, "port 80 should answer with a redirect"
    for listener in plain:
        assert [a["Type"] for a in listener["DefaultActions"]] == ["redirect"]
        assert listener["DefaultActions"][0]["RedirectConfig"]["Protocol"] == "HTTPS"


def test_the_gateway_is_the_only_target_of_the_public_load_balancer(template, resources):
    template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {"Port": table.GATEWAY_PORT, "HealthCheckPath": "/health/ready"},
    )
    task = task_of(resources, "gateway")
    (container,) = task["ContainerDefinitions"]
    assert "gateway-config" in container["Command"][2]
    assert "haproxy" in container["Command"][2]


def test_no_role_may_do_everything(resources):
    for key, policy in of_type(resources, "AWS::IAM::Policy").items():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            actions = statement["Action"]
            for action in [actions] if isinstance(actions, str) else actions:
                assert action != "*" and not action.endswith(":*"), (key, action)
            if statement["Resource"] == "*":
                # Only what AWS cannot scope to a resource.
                assert actions in (
                    "ecr:GetAuthorizationToken",
                    ["logs:PutRetentionPolicy", "logs:DeleteRetentionPolicy"],
                ), (key, actions)


def test_each_task_reads_only_the_secrets_its_process_needs(resources):
    ids = {name: secret_id(resources, secret) for name, secret in table.SECRET_NAMES.items()}
    for spec in table.SERVICES:
        task = task_of(resources, spec.name)
        readable = secrets_read_by(resources, ref(task["ExecutionRoleArn"]))
        assert readable == {ids[s] for s in spec.secrets}, spec.name
        # The running process's own role reads no secret at all.
        assert secrets_read_by(resources, ref(task["TaskRoleArn"])) == set(), spec.name
    gateway = task_of(resources, "gateway")
    assert secrets_read_by(resources, ref(gateway["ExecutionRoleArn"])) == {
        ids[table.REDIS],
        ids[table.KAFKA],
    }


def test_the_signing_keys_reach_the_auth_service_alone(resources):
    keys = secret_id(resources, table.SECRET_NAMES[table.SIGNING_KEYS])
    readers = [
        v["Properties"]["ServiceName"]
        for v in of_type(resources, "AWS::ECS::Service").values()
        if keys
        in secrets_read_by(
            resources, ref(task_of(resources, v["Properties"]["ServiceName"])["ExecutionRoleArn"])
        )
    ]
    assert readers == ["auth"]


def test_the_master_key_reaches_every_process_that_opens_personal_data_and_no_other(resources):
    key = secret_id(resources, table.SECRET_NAMES[table.MASTER_KEY])
    readers = {
        v["Properties"]["ServiceName"]
        for v in of_type(resources, "AWS::ECS::Service").values()
        if key
        in secrets_read_by(
            resources, ref(task_of(resources, v["Properties"]["ServiceName"])["ExecutionRoleArn"])
        )
    }
    # docs/privacy.md: the relay publishes what is stored (sealed) and auth holds no patient.
    assert readers == {s.name for s in table.SERVICES} - {"auth", "relay"}


def test_the_generated_master_key_is_a_form_the_settings_accept(resources):
    (master,) = [
        v["Properties"]
        for v in of_type(resources, "AWS::SecretsManager::Secret").values()
        if v["Properties"].get("Name") == table.SECRET_NAMES[table.MASTER_KEY]
    ]
    generated = master["GenerateSecretString"]
    # 64 characters from 0-9a-f: 32 bytes in hex.
    assert generated["PasswordLength"] == 64
    assert generated["ExcludeUppercase"] and generated["ExcludePunctuation"]
    assert set("ghijklmnopqrstuvwxyz") <= set(generated["ExcludeCharacters"])


def test_every_service_has_a_health_check_and_its_own_log_group(resources):
    services = of_type(resources, "AWS::ECS::Service")
    names = sorted(v["Properties"]["ServiceName"] for v in services.values())
    assert names == sorted([*(s.name for s in table.SERVICES), "gateway"])
    ports = {s.name: s.health_port for s in table.SERVICES} | {"gateway": table.GATEWAY_PORT}
    groups = set()
    for name in names:
        task = task_of(resources, name)
        essential = [c for c in task["ContainerDefinitions"] if c.get("Essential", True)]
        assert len(essential) == 1, name
        (container,) = essential
        check = " ".join(container["HealthCheck"]["Command"])
        assert f"127.0.0.1:{ports[name]}/health/ready" in check, name
        group = ref(container["LogConfiguration"]["Options"]["awslogs-group"])
        assert resources[group]["Properties"]["RetentionInDays"] >= 30, name
        groups.add(group)
    assert len(groups) == len(names), "each service logs into a group of its own"


def test_services_run_in_private_subnets_without_public_addresses(resources):
    for key, service in of_type(resources, "AWS::ECS::Service").items():
        network = service["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert network["AssignPublicIp"] == "DISABLED", key
        assert {subnet_type(resources, s) for s in network["Subnets"]} == {"Private"}, key


def test_consumers_scale_on_their_consumer_groups_lag(template):
    for spec in table.SERVICES:
        if spec.lag is None:
            continue
        template.has_resource_properties(
            "AWS::CloudWatch::Alarm",
            {
                "Metrics": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "MetricStat": Match.object_like(
                                    {
                                        "Metric": Match.object_like(
                                            {
                                                "Namespace": "AWS/Kafka",
                                                "MetricName": "SumOffsetLag",
                                                "Dimensions": Match.array_with(
                                                    [
                                                        {
                                                            "Name": "Consumer Group",
                                                            "Value": spec.lag.group,
                                                        }
                                                    ]
                                                ),
                                            }
                                        )
                                    }
                                )
                            }
                        )
                    ]
                )
            },
        )


def test_the_service_table_matches_the_code():
    from msgspec.structs import fields

    from billing_grpc.config import BillingConfig
    from bootstrap.cli import main
    from commands.reactions import GROUP as REMOVALS
    from domain.contracts import CONTRACTS
    from notifications.intake import GROUP as NOTIFIER
    from projections.analytics import GROUP as ANALYTICS
    from projections.appointments import GROUP as APPOINTMENTS
    from projections.worker import GROUP as DIRECTORY
    from runtime.kafka import EVENT_PARTITIONS
    from runtime.settings import DEFAULT_PORTS

    (billing_group,) = [f.default for f in fields(BillingConfig) if f.name == "consumer_group"]
    groups = {s.name: s.lag.group for s in table.SERVICES if s.lag is not None}
    assert groups == {
        "directory": DIRECTORY,
        "appointments": APPOINTMENTS,
        "patient-removals": REMOVALS,
        "analytics": ANALYTICS,
        "notifier": NOTIFIER,
        "billing": billing_group,
    }
    streams = {c.stream for c in CONTRACTS.values()}
    for spec in table.SERVICES:
        if spec.lag is not None:
            assert set(spec.lag.topics) <= streams, spec.name
            assert spec.max_tasks <= EVENT_PARTITIONS, spec.name
        with pytest.raises(SystemExit) as parsed:
            main([*spec.command[1:], "--help"])
        assert parsed.value.code == 0, spec.command
    ports = {s.health_port for s in table.SERVICES}
    assert set(DEFAULT_PORTS.values()) <= ports


@pytest.mark.skipif(shutil.which("npx") is None, reason="no npx to fetch the CDK command line")
def test_the_cdk_command_line_synthesises_the_app(tmp_path):
    """`cdk synth` itself (the command line from the npm registry, as `make synth` runs
    it), without AWS credentials: it writes the stack's template."""
    out = tmp_path / "cdk.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CDK_DEFAULT"))}
    done = subprocess.run(
        ["npx", "--yes", "aws-cdk@2", "synth", "--quiet", "--output", str(out)],
        cwd=ROOT / "ops" / "aws",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    templates = list(out.glob("*.template.json"))
    assert templates, f"no template in {out}: {sorted(p.name for p in out.iterdir())}"
    resources = json.loads(templates[0].read_text())["Resources"]
    assert any(r["Type"] == "AWS::RDS::DBInstance" for r in resources.values())
