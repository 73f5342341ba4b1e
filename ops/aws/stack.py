"""carelog's production stack on AWS: network, data stores, secrets and one ECS service per
process, behind the HAProxy gateway.

Why the HAProxy gateway stays behind the load balancer: the Application Load Balancer ends
TLS for clients and spreads connections over the gateway's tasks, but it cannot do what
the gateway is for. HAProxy checks every request's JWT (signature against the auth
service's published keys, issuer, audience, expiry, revoked tokens), applies the rate
limits per subject and per address and the login limits, routes reads to the query API and
writes to the command API, and serves the API documents; `carelog gateway-config` renders
all of that from the services themselves, so the same configuration runs locally and here.
The gateway reaches its three upstreams through an internal load balancer with one
listener per port (4000, 4003, 4005): the rendered configuration names one upstream host
with a port per service.

Data stores sit in isolated subnets (no route out), the tasks in private subnets (out
through NAT for the AWS APIs), and only the load balancer and the NAT gateways in public
ones. Every store encrypts at rest and in transit; every credential lives in Secrets
Manager, and each task's roles may read only the secrets that process needs.
"""

from __future__ import annotations

import string
from typing import Any

import aws_cdk as cdk
from aws_cdk import (
    aws_applicationautoscaling as appscaling,
)
from aws_cdk import (
    aws_certificatemanager as acm,
)
from aws_cdk import (
    aws_cloudwatch as cloudwatch,
)
from aws_cdk import (
    aws_ec2 as ec2,
)
from aws_cdk import (
    aws_ecr as ecr,
)
from aws_cdk import (
    aws_ecs as ecs,
)
from aws_cdk import (
    aws_elasticache as elasticache,
)
from aws_cdk import (
    aws_elasticloadbalancingv2 as elbv2,
)
from aws_cdk import (
    aws_kms as kms,
)
from aws_cdk import (
    aws_logs as logs,
)
from aws_cdk import (
    aws_msk as msk,
)
from aws_cdk import (
    aws_rds as rds,
)
from aws_cdk import (
    aws_secretsmanager as secretsmanager,
)
from aws_cdk import (
    aws_servicediscovery as servicediscovery,
)
from aws_cdk import (
    custom_resources as cr,
)
from constructs import Construct

from ops.aws import services as table
from ops.aws.services import SERVICES, Service

DB_NAME = "carelog"
DB_USER = "carelog"
NAMESPACE = "carelog.internal"
KAFKA_SCRAM_PORT = 9096
# Generated passwords end up in URLs (postgresql://, rediss://): letters and digits only.
URL_UNSAFE = string.punctuation + " "
KAFKA_REPLICATION = 3
USER_TEMPLATE = '{"username": "carelog"}'
EMPTY_TEMPLATE = "{}"

CONTEXT_DEFAULTS: dict[str, Any] = {
    "certificate_arn": "",
    "image": "",
    "ecr_repository": "carelog",
    "image_tag": "latest",
    "gateway_image_tag": "gateway-latest",
    "db_instance_class": "r6g.large",
    "db_allocated_storage_gb": 100,
    "db_backup_retention_days": 14,
    "redis_node_type": "cache.r6g.large",
    "kafka_version": "3.9.x",
    "kafka_broker_type": "kafka.m7g.large",
    "kafka_volume_gb": 500,
    "log_retention_days": 90,
    "smtp_host": "",
    "mail_from": "",
    "practice_name": "carelog",
    "nat_gateways": 2,
}
"""Context values (`cdk.json` or `-c key=value`) and their defaults."""

RETENTION = {
    30: logs.RetentionDays.ONE_MONTH,
    90: logs.RetentionDays.THREE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    731: logs.RetentionDays.TWO_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}
"""Log retentions CloudWatch offers (days), from a month up."""

HEALTH = "import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/health/ready', timeout=2)"

# Composes the URLs the settings want from the parts ECS injects (address in plain
# environment, passwords from Secrets Manager), then runs the process itself.
URLS = (
    'export CARELOG_DATABASE_URL="postgresql://$CARELOG_DB_USER:$CARELOG_DB_PASSWORD'
    '@$CARELOG_DB_HOST:$CARELOG_DB_PORT/$CARELOG_DB_NAME?sslmode=require"'
    ' CARELOG_REDIS_URL="rediss://:$CARELOG_REDIS_TOKEN@$CARELOG_REDIS_HOST:6379/0";'
    " unset CARELOG_DB_PASSWORD CARELOG_REDIS_TOKEN;"
)
ENTRY = URLS + ' exec "$@"'

# The auth service's key directory, written from its Secrets Manager secret:
# {"current": "<kid>", "keys": {"<kid>": "<PEM>", ...}}.
WRITE_KEYS = (
    "import json, os, pathlib; d = pathlib.Path(os.environ['CARELOG_AUTH_KEYS_DIR']);"
    " d.mkdir(mode=0o700, parents=True, exist_ok=True);"
    " s = json.loads(os.environ['CARELOG_SIGNING_KEYS']);"
    " [(d / (k + '.pem')).write_text(p) for k, p in s['keys'].items()];"
    " (d / 'current').write_text(s['current']);"
    " [f.chmod(0o600) for f in d.iterdir()]"
)
KEYS_ENTRY = f'python -c "{WRITE_KEYS}" && unset CARELOG_SIGNING_KEYS && {ENTRY}'

# The gateway renders its HAProxy configuration from the services (keys from the auth
# service's JWKS), then HAProxy runs in the foreground, master-worker.
GATEWAY_ENTRY = (
    'carelog gateway-config --jwks-url "$CARELOG_JWKS_URL"'
    ' && exec haproxy -W -db -f "$CARELOG_GATEWAY_DIR/haproxy.cfg"'
)


def context(scope: Construct, key: str) -> Any:
    """A context value, or its default from CONTEXT_DEFAULTS."""
    value = scope.node.try_get_context(key)
    return CONTEXT_DEFAULTS[key] if value is None else value


class CarelogStack(cdk.Stack):
    """Everything carelog needs in one AWS account and region."""

    def __init__(self, scope: Construct, construct_id: str, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        certificate_arn = str(context(self, "certificate_arn"))
        if not certificate_arn.startswith("arn:"):
            raise ValueError(
                "context certificate_arn: the ACM certificate's ARN for the HTTPS listener"
                " (cdk synth -c certificate_arn=arn:aws:acm:...)"
            )
        days = int(context(self, "log_retention_days"))
        if days not in RETENTION:
            raise ValueError(f"context log_retention_days: one of {sorted(RETENTION)}")
        self.retention = RETENTION[days]

        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=3,
            nat_gateways=int(context(self, "nat_gateways")),
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24
                ),
                ec2.SubnetConfiguration(
                    name="app", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20
                ),
                ec2.SubnetConfiguration(
                    name="data", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=24
                ),
            ],
        )
        self.app_subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        self.data_subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)

        self._secrets()
        self._database()
        self._redis()
        self._kafka()
        self._cluster()
        self._services()
        self._gateway(certificate_arn)

    # --- Secrets ---------------------------------------------------------------------------

    def _secrets(self) -> None:
        self.signing_keys = secretsmanager.Secret(
            self,
            "SigningKeys",
            secret_name=table.SECRET_NAMES[table.SIGNING_KEYS],
            description='Token signing keys: {"current": kid, "keys": {kid: PEM}} (ES256)',
        )
        self.master_key = secretsmanager.Secret(
            self,
            "MasterKey",
            secret_name=table.SECRET_NAMES[table.MASTER_KEY],
            description="Master key that wraps every patient's data key (CARELOG_MASTER_KEY)",
            # 32 random bytes as 64 hex digits, a form CARELOG_MASTER_KEY accepts.
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=64,
                exclude_punctuation=True,
                exclude_uppercase=True,
                exclude_characters="ghijklmnopqrstuvwxyz",
            ),
        )
        self.claim_key = secretsmanager.Secret(
            self,
            "ClaimKey",
            secret_name=table.SECRET_NAMES[table.CLAIM_KEY],
            description="The key email claims are keyed under (CARELOG_CLAIM_KEY)",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=64, exclude_punctuation=True
            ),
        )
        self.smtp = secretsmanager.Secret(
            self,
            "Smtp",
            secret_name=table.SECRET_NAMES[table.SMTP],
            description="The notifier's SMTP user: {username, password}",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                secret_string_template=USER_TEMPLATE,
                generate_string_key="password",
                exclude_punctuation=True,
            ),
        )

    # --- Data stores -----------------------------------------------------------------------

    def _database(self) -> None:
        self.db_security = ec2.SecurityGroup(
            self, "DatabaseSecurity", vpc=self.vpc, allow_all_outbound=False
        )
        parameters = rds.ParameterGroup(
            self,
            "DatabaseParameters",
            engine=rds.DatabaseInstanceEngine.postgres(version=rds.PostgresEngineVersion.VER_15),
            parameters={
                "rds.force_ssl": "1",
                "max_connections": "500",
                # As on the local stack: a server log that keeps no values.
                "log_statement": "none",
                "log_min_duration_statement": "-1",
                "log_min_error_statement": "panic",
                "log_error_verbosity": "terse",
                "log_parameter_max_length": "0",
                "log_parameter_max_length_on_error": "0",
            },
        )
        self.database = rds.DatabaseInstance(
            self,
            "Database",
            engine=rds.DatabaseInstanceEngine.postgres(version=rds.PostgresEngineVersion.VER_15),
            instance_type=ec2.InstanceType(str(context(self, "db_instance_class"))),
            vpc=self.vpc,
            vpc_subnets=self.data_subnets,
            security_groups=[self.db_security],
            publicly_accessible=False,
            multi_az=True,
            storage_encrypted=True,
            allocated_storage=int(context(self, "db_allocated_storage_gb")),
            storage_type=rds.StorageType.GP3,
            database_name=DB_NAME,
            credentials=rds.Credentials.from_generated_secret(
                DB_USER,
                secret_name=table.SECRET_NAMES[table.DATABASE],
                exclude_characters=URL_UNSAFE,
            ),
            parameter_group=parameters,
            backup_retention=cdk.Duration.days(int(context(self, "db_backup_retention_days"))),
            preferred_backup_window="02:00-03:00",
            copy_tags_to_snapshot=True,
            deletion_protection=True,
            removal_policy=cdk.RemovalPolicy.SNAPSHOT,
            cloudwatch_logs_exports=["postgresql"],
            cloudwatch_logs_retention=self.retention,
            enable_performance_insights=True,
        )
        assert self.database.secret is not None
        self.db_secret = self.database.secret

    def _redis(self) -> None:
        self.redis_security = ec2.SecurityGroup(
            self, "RedisSecurity", vpc=self.vpc, allow_all_outbound=False
        )
        self.redis_secret = secretsmanager.Secret(
            self,
            "RedisToken",
            secret_name=table.SECRET_NAMES[table.REDIS],
            description="ElastiCache Redis AUTH token: {token}",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                secret_string_template=EMPTY_TEMPLATE,
                generate_string_key="token",
                password_length=64,
                exclude_punctuation=True,
            ),
        )
        subnets = elasticache.CfnSubnetGroup(
            self,
            "RedisSubnets",
            description="carelog cache",
            subnet_ids=self.vpc.select_subnets(
                subnet_type=ec2.SubnetType.PRIVATE_ISOLATED
            ).subnet_ids,
        )
        self.redis = elasticache.CfnReplicationGroup(
            self,
            "Redis",
            replication_group_description="carelog cache and revocations",
            engine="redis",
            engine_version="7.1",
            cache_node_type=str(context(self, "redis_node_type")),
            num_cache_clusters=2,
            automatic_failover_enabled=True,
            multi_az_enabled=True,
            cache_subnet_group_name=subnets.ref,
            security_group_ids=[self.redis_security.security_group_id],
            at_rest_encryption_enabled=True,
            transit_encryption_enabled=True,
            auth_token=self.redis_secret.secret_value_from_json("token").unsafe_unwrap(),
            port=6379,
        )

    def _kafka(self) -> None:
        self.kafka_security = ec2.SecurityGroup(
            self, "KafkaSecurity", vpc=self.vpc, allow_all_outbound=False
        )
        # MSK takes SCRAM users only from secrets under a customer-managed key.
        key = kms.Key(self, "KafkaSecretKey", enable_key_rotation=True)
        self.kafka_secret = secretsmanager.Secret(
            self,
            "KafkaUser",
            secret_name=table.SECRET_NAMES[table.KAFKA],
            encryption_key=key,
            description="The services' SCRAM-SHA-512 user on MSK: {username, password}",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                secret_string_template=USER_TEMPLATE,
                generate_string_key="password",
                password_length=48,
                exclude_punctuation=True,
            ),
        )
        configuration = msk.CfnConfiguration(
            self,
            "KafkaConfiguration",
            name="carelog",
            server_properties="\n".join(
                (
                    "auto.create.topics.enable=false",
                    f"default.replication.factor={KAFKA_REPLICATION}",
                    "min.insync.replicas=2",
                    "unclean.leader.election.enable=false",
                    "offsets.topic.replication.factor=3",
                    "transaction.state.log.replication.factor=3",
                    "transaction.state.log.min.isr=2",
                )
            ),
        )
        subnets = self.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)
        self.kafka = msk.CfnCluster(
            self,
            "Kafka",
            cluster_name="carelog",
            kafka_version=str(context(self, "kafka_version")),
            number_of_broker_nodes=len(subnets.subnet_ids),
            broker_node_group_info=msk.CfnCluster.BrokerNodeGroupInfoProperty(
                client_subnets=subnets.subnet_ids,
                instance_type=str(context(self, "kafka_broker_type")),
                security_groups=[self.kafka_security.security_group_id],
                storage_info=msk.CfnCluster.StorageInfoProperty(
                    ebs_storage_info=msk.CfnCluster.EBSStorageInfoProperty(
                        volume_size=int(context(self, "kafka_volume_gb"))
                    )
                ),
            ),
            client_authentication=msk.CfnCluster.ClientAuthenticationProperty(
                sasl=msk.CfnCluster.SaslProperty(scram=msk.CfnCluster.ScramProperty(enabled=True)),
                unauthenticated=msk.CfnCluster.UnauthenticatedProperty(enabled=False),
            ),
            encryption_info=msk.CfnCluster.EncryptionInfoProperty(
                encryption_at_rest=msk.CfnCluster.EncryptionAtRestProperty(
                    data_volume_kms_key_id=key.key_arn
                ),
                encryption_in_transit=msk.CfnCluster.EncryptionInTransitProperty(
                    client_broker="TLS", in_cluster=True
                ),
            ),
            configuration_info=msk.CfnCluster.ConfigurationInfoProperty(
                arn=configuration.attr_arn, revision=1
            ),
            enhanced_monitoring="PER_TOPIC_PER_PARTITION",
            logging_info=msk.CfnCluster.LoggingInfoProperty(
                broker_logs=msk.CfnCluster.BrokerLogsProperty(
                    cloud_watch_logs=msk.CfnCluster.CloudWatchLogsProperty(
                        enabled=True,
                        log_group=logs.LogGroup(
                            self, "KafkaLogs", retention=self.retention
                        ).log_group_name,
                    )
                )
            ),
        )
        msk.CfnBatchScramSecret(
            self,
            "KafkaUsers",
            cluster_arn=self.kafka.attr_arn,
            secret_arn_list=[self.kafka_secret.secret_arn],
        )
        # CloudFormation has no attribute for the brokers' addresses: ask the MSK API once.
        brokers = cr.AwsCustomResource(
            self,
            "KafkaBrokers",
            on_update=cr.AwsSdkCall(
                service="Kafka",
                action="getBootstrapBrokers",
                parameters={"ClusterArn": self.kafka.attr_arn},
                physical_resource_id=cr.PhysicalResourceId.of("carelog-kafka-brokers"),
            ),
            policy=cr.AwsCustomResourcePolicy.from_sdk_calls(resources=[self.kafka.attr_arn]),
            install_latest_aws_sdk=False,
        )
        self.kafka_bootstrap = brokers.get_response_field("BootstrapBrokerStringSaslScram")

    # --- Cluster ---------------------------------------------------------------------------

    def _cluster(self) -> None:
        self.cluster = ecs.Cluster(
            self,
            "Cluster",
            vpc=self.vpc,
            container_insights_v2=ecs.ContainerInsights.ENABLED,
        )
        self.namespace = servicediscovery.PrivateDnsNamespace(
            self, "Namespace", name=NAMESPACE, vpc=self.vpc
        )
        image = str(context(self, "image"))
        self.image: ecs.ContainerImage
        self.gateway_image: ecs.ContainerImage
        if image:
            self.image = ecs.ContainerImage.from_registry(image)
            self.gateway_image = ecs.ContainerImage.from_registry(
                str(self.node.try_get_context("gateway_image") or image)
            )
        else:
            repository = ecr.Repository.from_repository_name(
                self, "Images", str(context(self, "ecr_repository"))
            )
            self.image = ecs.ContainerImage.from_ecr_repository(
                repository, str(context(self, "image_tag"))
            )
            self.gateway_image = ecs.ContainerImage.from_ecr_repository(
                repository, str(context(self, "gateway_image_tag"))
            )
        # The gateway's upstreams: one internal load balancer, a listener per service port.
        self.upstream_security = ec2.SecurityGroup(
            self, "UpstreamSecurity", vpc=self.vpc, allow_all_outbound=False
        )
        self.upstreams = elbv2.ApplicationLoadBalancer(
            self,
            "Upstreams",
            vpc=self.vpc,
            internet_facing=False,
            vpc_subnets=self.app_subnets,
            security_group=self.upstream_security,
        )
        self.gateway_security = ec2.SecurityGroup(self, "GatewaySecurity", vpc=self.vpc)

    def _environment(self) -> dict[str, str]:
        return {
            "CARELOG_ENV": "production",
            "CARELOG_HTTP_HOST": "0.0.0.0",  # noqa: S104 - the task's own interface, in a private subnet
            "CARELOG_DB_HOST": self.database.db_instance_endpoint_address,
            "CARELOG_DB_PORT": self.database.db_instance_endpoint_port,
            "CARELOG_DB_NAME": DB_NAME,
            "CARELOG_REDIS_HOST": self.redis.attr_primary_end_point_address,
            "CARELOG_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CARELOG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "CARELOG_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "CARELOG_KAFKA_REPLICATION_FACTOR": str(KAFKA_REPLICATION),
            "CARELOG_JWKS_URL": f"http://auth.{NAMESPACE}:4005/auth/.well-known/jwks.json",
            "CARELOG_AUTH_KEYS_DIR": "/tmp/carelog-keys",  # noqa: S108 - the task's own disk
        }

    def _secret_env(self, names: tuple[str, ...]) -> dict[str, ecs.Secret]:
        """The environment variables each named secret fills, and only those."""
        fills: dict[str, dict[str, ecs.Secret]] = {
            # The user too: a rotation that alternates users changes it.
            table.DATABASE: {
                "CARELOG_DB_USER": ecs.Secret.from_secrets_manager(self.db_secret, "username"),
                "CARELOG_DB_PASSWORD": ecs.Secret.from_secrets_manager(self.db_secret, "password"),
            },
            table.REDIS: {
                "CARELOG_REDIS_TOKEN": ecs.Secret.from_secrets_manager(self.redis_secret, "token")
            },
            table.KAFKA: {
                "CARELOG_KAFKA_USERNAME": ecs.Secret.from_secrets_manager(
                    self.kafka_secret, "username"
                ),
                "CARELOG_KAFKA_PASSWORD": ecs.Secret.from_secrets_manager(
                    self.kafka_secret, "password"
                ),
            },
            table.SIGNING_KEYS: {
                "CARELOG_SIGNING_KEYS": ecs.Secret.from_secrets_manager(self.signing_keys)
            },
            table.MASTER_KEY: {
                "CARELOG_MASTER_KEY": ecs.Secret.from_secrets_manager(self.master_key)
            },
            table.CLAIM_KEY: {"CARELOG_CLAIM_KEY": ecs.Secret.from_secrets_manager(self.claim_key)},
            table.SMTP: {
                "CARELOG_SMTP_USERNAME": ecs.Secret.from_secrets_manager(self.smtp, "username"),
                "CARELOG_SMTP_PASSWORD": ecs.Secret.from_secrets_manager(self.smtp, "password"),
            },
        }
        env: dict[str, ecs.Secret] = {}
        for name in names:
            env.update(fills[name])
        return env

    def _log_group(self, name: str) -> logs.LogGroup:
        return logs.LogGroup(
            self,
            f"Logs{_camel(name)}",
            log_group_name=f"/carelog/{name}",
            retention=self.retention,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )

    # --- Services --------------------------------------------------------------------------

    def _services(self) -> None:
        self.services: dict[str, ecs.FargateService] = {}
        self.security_groups: dict[str, ec2.SecurityGroup] = {}
        for spec in SERVICES:
            self.services[spec.name] = self._service(spec)
        self._one_shot("topics", ("carelog", "topics"))
        self._one_shot("migrate", ("carelog", "db", "migrate"))
        self._network()

    def _task(
        self, spec_name: str, cpu: int, memory: int
    ) -> tuple[ecs.FargateTaskDefinition, logs.LogGroup]:
        task = ecs.FargateTaskDefinition(
            self,
            f"Task{_camel(spec_name)}",
            family=f"carelog-{spec_name}",
            cpu=cpu,
            memory_limit_mib=memory,
            runtime_platform=ecs.RuntimePlatform(
                cpu_architecture=ecs.CpuArchitecture.X86_64,
                operating_system_family=ecs.OperatingSystemFamily.LINUX,
            ),
        )
        return task, self._log_group(spec_name)

    def _service(self, spec: Service) -> ecs.FargateService:
        task, log_group = self._task(spec.name, spec.cpu, spec.memory)
        env = {**self._environment(), **spec.env}
        if spec.name == "notifier":
            env.update(
                CARELOG_SMTP_HOST=str(context(self, "smtp_host")),
                CARELOG_SMTP_PORT="587",
                CARELOG_SMTP_STARTTLS="true",
                CARELOG_MAIL_FROM=str(context(self, "mail_from")),
                CARELOG_PRACTICE_NAME=str(context(self, "practice_name")),
            )
        secrets = self._secret_env(spec.secrets)
        entry = KEYS_ENTRY if table.SIGNING_KEYS in spec.secrets else ENTRY
        logging = ecs.LogDriver.aws_logs(stream_prefix=spec.name, log_group=log_group)
        app = task.add_container(
            "app",
            image=self.image,
            command=["sh", "-c", entry, "carelog", *spec.command],
            environment=env,
            secrets=secrets,
            logging=logging,
            port_mappings=[
                ecs.PortMapping(container_port=port, name=f"port-{port}")
                for port in (spec.health_port, *spec.extra_ports)
            ],
            health_check=_health_check(spec.health_port),
            readonly_root_filesystem=False,
        )
        if spec.migrates:
            migrate = task.add_container(
                "migrate",
                image=self.image,
                command=["sh", "-c", ENTRY, "carelog", "carelog", "db", "migrate"],
                environment=self._environment(),
                # With the claim key (the command API's task), it also rekeys the claims.
                secrets=self._secret_env(
                    tuple(s for s in spec.secrets if s in (*table.BACKEND, table.CLAIM_KEY))
                ),
                logging=logging,
                essential=False,
            )
            app.add_container_dependencies(
                ecs.ContainerDependency(
                    container=migrate, condition=ecs.ContainerDependencyCondition.SUCCESS
                )
            )
        security = ec2.SecurityGroup(self, f"Security{_camel(spec.name)}", vpc=self.vpc)
        self.security_groups[spec.name] = security
        cloud_map = None
        if spec.name in ("billing", "auth"):
            cloud_map = ecs.CloudMapOptions(
                name=spec.name,
                cloud_map_namespace=self.namespace,
                dns_record_type=servicediscovery.DnsRecordType.A,
                dns_ttl=cdk.Duration.seconds(10),
            )
        service = ecs.FargateService(
            self,
            f"Service{_camel(spec.name)}",
            cluster=self.cluster,
            service_name=spec.name,
            task_definition=task,
            desired_count=spec.min_tasks,
            vpc_subnets=self.app_subnets,
            security_groups=[security],
            assign_public_ip=False,
            cloud_map_options=cloud_map,
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            min_healthy_percent=100 if spec.min_tasks > 1 else 0,
            max_healthy_percent=200,
            enable_execute_command=False,
        )
        self._scaling(spec, service)
        if spec.name in table.BEHIND_GATEWAY:
            self._behind_gateway(spec, service)
        return service

    def _scaling(self, spec: Service, service: ecs.FargateService) -> None:
        if not spec.scales:
            return
        scaling = service.auto_scale_task_count(
            min_capacity=spec.min_tasks, max_capacity=spec.max_tasks
        )
        scaling.scale_on_cpu_utilization(
            "Cpu",
            target_utilization_percent=60,
            scale_in_cooldown=cdk.Duration.minutes(5),
            scale_out_cooldown=cdk.Duration.minutes(1),
        )
        if spec.lag is None:
            return
        lags = {
            f"lag{i}": cloudwatch.Metric(
                namespace="AWS/Kafka",
                metric_name="SumOffsetLag",
                dimensions_map={
                    "Cluster Name": "carelog",
                    "Consumer Group": spec.lag.group,
                    "Topic": topic,
                },
                statistic="Maximum",
                period=cdk.Duration.minutes(1),
            )
            for i, topic in enumerate(spec.lag.topics)
        }
        lag = cloudwatch.MathExpression(
            expression=" + ".join(lags),
            using_metrics=lags,
            label=f"{spec.lag.group} lag (events)",
            period=cdk.Duration.minutes(1),
        )
        scaling.scale_on_metric(
            "Lag",
            metric=lag,
            adjustment_type=appscaling.AdjustmentType.CHANGE_IN_CAPACITY,
            scaling_steps=[
                appscaling.ScalingInterval(upper=100, change=-1),
                appscaling.ScalingInterval(lower=1_000, upper=10_000, change=+1),
                appscaling.ScalingInterval(lower=10_000, change=+3),
            ],
            cooldown=cdk.Duration.minutes(2),
            evaluation_periods=3,
        )

    def _behind_gateway(self, spec: Service, service: ecs.FargateService) -> None:
        port = table.BEHIND_GATEWAY[spec.name]
        listener = self.upstreams.add_listener(
            f"Upstream{_camel(spec.name)}",
            port=port,
            protocol=elbv2.ApplicationProtocol.HTTP,
            open=False,
        )
        listener.add_targets(
            _camel(spec.name),
            port=port,
            protocol=elbv2.ApplicationProtocol.HTTP,
            targets=[service],
            health_check=elbv2.HealthCheck(path="/health/ready", interval=cdk.Duration.seconds(10)),
            deregistration_delay=cdk.Duration.seconds(30),
        )
        self.upstream_security.add_ingress_rule(
            self.gateway_security, ec2.Port.tcp(port), f"gateway to {spec.name}"
        )

    def _one_shot(self, name: str, command: tuple[str, ...]) -> None:
        """A task definition to run by hand (`aws ecs run-task`), not a service."""
        task, log_group = self._task(name, 512, 1024)
        task.add_container(
            "app",
            image=self.image,
            command=["sh", "-c", ENTRY, "carelog", *command],
            environment=self._environment(),
            secrets=self._secret_env(table.BACKEND),
            logging=ecs.LogDriver.aws_logs(stream_prefix=name, log_group=log_group),
        )
        security = ec2.SecurityGroup(self, f"Security{_camel(name)}", vpc=self.vpc)
        self.security_groups[name] = security
        cdk.CfnOutput(self, f"{_camel(name)}Task", value=task.task_definition_arn)
        cdk.CfnOutput(self, f"{_camel(name)}SecurityGroup", value=security.security_group_id)

    def _network(self) -> None:
        """Who may reach what: each store from the app tasks, auth and billing from them."""
        for name, security in self.security_groups.items():
            self.db_security.add_ingress_rule(security, ec2.Port.tcp(5432), name)
            self.redis_security.add_ingress_rule(security, ec2.Port.tcp(6379), name)
            self.kafka_security.add_ingress_rule(security, ec2.Port.tcp(KAFKA_SCRAM_PORT), name)
            if name in table.BY_NAME:
                auth = self.security_groups["auth"]
                billing = self.security_groups["billing"]
                auth.add_ingress_rule(security, ec2.Port.tcp(4005), f"{name}: JWKS")
                billing.add_ingress_rule(
                    security, ec2.Port.tcp(table.BILLING_GRPC_PORT), f"{name}: gRPC"
                )
        self.security_groups["auth"].add_ingress_rule(
            self.gateway_security, ec2.Port.tcp(4005), "gateway: JWKS"
        )
        self.redis_security.add_ingress_rule(
            self.gateway_security, ec2.Port.tcp(6379), "gateway: revocations"
        )
        cdk.CfnOutput(self, "ClusterName", value=self.cluster.cluster_name)
        cdk.CfnOutput(
            self,
            "AppSubnets",
            value=",".join(
                self.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS).subnet_ids
            ),
        )

    # --- Gateway ---------------------------------------------------------------------------

    def _gateway(self, certificate_arn: str) -> None:
        task, log_group = self._task("gateway", 1024, 2048)
        env = {
            **self._environment(),
            # The gateway renders one upstream host: the internal load balancer.
            "CARELOG_HTTP_HOST": self.upstreams.load_balancer_dns_name,
            "CARELOG_GATEWAY_DIR": "/tmp/carelog-gateway",  # noqa: S108 - the task's own disk
            "CARELOG_GATEWAY_PORT": str(table.GATEWAY_PORT),
            "CARELOG_DB_USER": DB_USER,
        }
        task.add_container(
            "haproxy",
            image=self.gateway_image,
            command=["sh", "-c", f"{URLS} {GATEWAY_ENTRY}"],
            environment=env,
            # Revocations come from Redis; the gateway needs no database password.
            secrets=self._secret_env((table.REDIS, table.KAFKA)),
            logging=ecs.LogDriver.aws_logs(stream_prefix="gateway", log_group=log_group),
            port_mappings=[ecs.PortMapping(container_port=table.GATEWAY_PORT)],
            health_check=_health_check(table.GATEWAY_PORT),
        )
        gateway = ecs.FargateService(
            self,
            "ServiceGateway",
            cluster=self.cluster,
            service_name="gateway",
            task_definition=task,
            desired_count=2,
            vpc_subnets=self.app_subnets,
            security_groups=[self.gateway_security],
            assign_public_ip=False,
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            min_healthy_percent=100,
        )
        for upstream in table.BEHIND_GATEWAY:
            gateway.node.add_dependency(self.services[upstream])
        scaling = gateway.auto_scale_task_count(min_capacity=2, max_capacity=8)
        scaling.scale_on_cpu_utilization("Cpu", target_utilization_percent=60)

        alb = elbv2.ApplicationLoadBalancer(
            self,
            "Entry",
            vpc=self.vpc,
            internet_facing=True,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
            drop_invalid_header_fields=True,
        )
        https = alb.add_listener(
            "Https",
            port=443,
            protocol=elbv2.ApplicationProtocol.HTTPS,
            certificates=[
                acm.Certificate.from_certificate_arn(self, "Certificate", certificate_arn)
            ],
            ssl_policy=elbv2.SslPolicy.RECOMMENDED_TLS,
        )
        https.add_targets(
            "Gateway",
            port=table.GATEWAY_PORT,
            protocol=elbv2.ApplicationProtocol.HTTP,
            targets=[gateway],
            health_check=elbv2.HealthCheck(path="/health/ready", interval=cdk.Duration.seconds(10)),
            deregistration_delay=cdk.Duration.seconds(30),
        )
        alb.add_redirect(source_port=80, target_port=443)
        cdk.CfnOutput(self, "EntryAddress", value=alb.load_balancer_dns_name)


def _health_check(port: int) -> ecs.HealthCheck:
    return ecs.HealthCheck(
        command=["CMD", "python", "-c", HEALTH.format(port=port)],
        interval=cdk.Duration.seconds(15),
        timeout=cdk.Duration.seconds(5),
        retries=3,
        start_period=cdk.Duration.seconds(60),
    )


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))
