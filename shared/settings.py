"""Every tunable of roomcast in one typed object, read from the environment once.

Services take a `Settings` and pass it down; nothing else reads the environment. The environment
variable of a field is its name in upper case (`buffer_cap` -> `BUFFER_CAP`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DAY_S = 24 * 3600
DEV_JWT_SECRET = "roomcast-dev-secret-change-me-in-production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True)

    # --- identity and logging
    node_id: str = Field("", description="Name of this process in logs and metrics; empty: host:port")
    log_level: str = "INFO"
    log_json: bool = True

    # --- Kafka (the durable log)
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_topic: str = "chat.messages"
    kafka_partitions: int = Field(8, ge=1, description="Fixed at topic creation: changing it remaps rooms")
    kafka_replication: int = Field(1, ge=1)
    kafka_topic_retention_ms: int = Field(14 * DAY_S * 1000, description="Must exceed redis_retention_s")
    kafka_linger_ms: int = Field(
        0, ge=0, description="Producer batching delay; records still batch while a request is in flight"
    )
    kafka_request_timeout_ms: int = Field(5000, ge=100)
    kafka_fanout_client: Literal["librdkafka", "aiokafka"] = Field(
        "librdkafka", description="The fan-out's reader of the log; librdkafka costs a gateway less CPU per record"
    )
    kafka_startup_wait_s: float = Field(
        300.0, ge=0, description="How long a starting gateway or persister waits for the broker before it exits"
    )
    kafka_fetch_max_wait_ms: int = Field(
        500, ge=0, description="Longest wait of an empty fetch; Kafka answers as soon as a record arrives"
    )
    kafka_fanout_fetch_min_bytes: int = Field(
        1, ge=1, description="The librdkafka fan-out's fetches wait for this many bytes (or their wait) before "
                             "the broker answers: fewer, fuller fetches under load (bench/README.md)"
    )
    kafka_fanout_fetch_wait_ms: int | None = Field(
        None, ge=0, description="The librdkafka fan-out's fetch wait; unset: KAFKA_FETCH_MAX_WAIT_MS"
    )
    kafka_session_timeout_ms: int = Field(10000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(3000, ge=100)
    kafka_persister_group: str = "persister"
    kafka_signals_topic: str = Field(
        "chat.signals", description="Ephemeral signals (presence, typing, receipts), read by every gateway"
    )
    kafka_signals_retention_ms: int = Field(60_000, ge=1000, description="Signals are never replayed: minutes at most")
    kafka_reads_topic: str = Field(
        "chat.reads", description="Read marks, compacted (key = user + room): the durable record of what was read"
    )

    # --- Redis (write buffer + cache of the newest messages)
    redis_url: str = "redis://127.0.0.1:6380/0"
    redis_cluster: bool = Field(False, description="REDIS_URL names a node of a Redis Cluster")
    redis_prefix: str = Field("rc", description="Key prefix, so several deployments or tests share a Redis")
    redis_pool_max: int = Field(100, ge=1, description="Redis connections per process (one server); a "
                                "command past them waits for one instead of failing")
    buffer_cap: int = Field(200, ge=2, description="A room's list past this many messages gets flushed")
    flush_chunk: int = Field(100, ge=1, description="Oldest messages moved to MySQL in one batch")
    redis_retention_s: int = Field(7 * DAY_S, ge=1, description="Messages older than this leave Redis")
    persister_backlog_budget: int = Field(
        500_000, ge=1, description="Messages buffered past the cap (MySQL down) before consuming pauses"
    )
    persister_linger_ms: int = Field(
        20, ge=0, description="Records gathered this long after a fetch, then applied in one Redis round trip"
    )
    persister_batch_max: int = Field(500, ge=1, description="Kafka records applied per Redis round trip")
    dedupe_ttl_s: int = Field(3600, ge=1, description="How long a (user, client_msg_id) is remembered")

    # --- MySQL (the archive)
    mysql_dsn: str = "mysql://root:@127.0.0.1:3306/roomcast"
    mysql_pool_max: int = Field(10, ge=1)

    # --- sweeper (retention)
    sweep_policy: Literal["message", "list"] = Field(
        "message", description="message: only old messages leave Redis; list: idle rooms leave whole"
    )
    sweep_chunk: int = Field(100, ge=1, description="Rooms read per MySQL query while walking rooms")
    sweep_pause_s: float = Field(0.05, ge=0, description="Sleep between room chunks")
    sweep_interval_s: float = Field(300.0, gt=0, description="Time between sweeps when running continuously")

    # --- gateway
    host: str = "127.0.0.1"
    port: int = 8001
    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    jwt_audience: str = Field("", description="Required `aud` of every token (minted with it); empty: not checked")
    jwt_issuer: str = Field("", description="Required `iss` of every token (minted with it); empty: not checked")
    token_max_rooms: int = Field(1000, ge=1, description="A token whose rooms claim has more entries is refused")
    token_ttl_s: int = Field(24 * 3600, ge=1, description="Lifetime of tokens minted by `roomcast token`")
    dev_mode: bool = Field(False, description="Serves /dev/token for the chat page; never in production")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated browser Origins allowed; empty: any"
    )
    send_queue_max: int = Field(1000, ge=1, description="Frames queued per connection before it is closed 4008")
    max_frame_bytes: int = Field(64 * 1024, ge=256)
    max_body_chars: int = Field(4000, ge=1)
    max_rooms_per_conn: int = Field(100, ge=1)
    max_conns_per_user: int = Field(50, ge=1, description="Connections per user, all gateways together")
    send_rate_per_s: float = Field(50.0, gt=0, description="Per-user send rate, all gateways together")
    send_burst: int = Field(100, ge=1)
    send_lease: int = Field(
        5, ge=1, description="Sends a gateway takes from a user's shared budget per Redis round trip"
    )
    gateway_lease_s: float = Field(
        15.0, gt=0, description="A gateway that stopped renewing this long ago: its connections no longer count"
    )
    auth_timeout_s: float = Field(
        5.0, gt=0, description="Time to send the HTTP request, and the auth frame when no token came with it"
    )
    max_unauthenticated: int = Field(
        500, ge=0, description="Connections of a gateway waiting for their auth frame; more are closed 1013"
    )
    history_limit_default: int = Field(50, ge=1)
    history_limit_max: int = Field(200, ge=1)
    recovery_wait_s: float = Field(5.0, gt=0, description="How long a resume waits for the persister")
    resume_kafka_max_records: int = Field(
        100_000, ge=0, description="Most records a resume reads from Kafka when the persister is behind"
    )
    resume_max_messages: int = Field(
        5000, ge=1, description="A resume that missed more replays nothing (recovered=false; page history)"
    )
    resume_budget: int = Field(
        50_000, ge=1, description="Stored entries a connection's resumes may read in a burst (then at the refill)"
    )
    resume_budget_per_s: float = Field(5000.0, gt=0, description="Refill of a connection's resume budget")
    ready_max_lag: int = Field(10_000, ge=0, description="Fan-out lag (records) past which /readyz fails")
    ready_stall_s: float = Field(
        30.0, gt=0, description="Fan-out silent this long while lagging, or without a fetch answered: not ready"
    )
    drain_delay_s: float = Field(
        5.0, ge=0, description="On SIGTERM, /readyz answers 503 this long before clients are closed 1012"
    )
    drain_grace_s: float = Field(10.0, ge=0)
    ping_interval_s: float = Field(20.0, gt=0)
    metrics_port: int = Field(0, ge=0, description="Prometheus port of a persister, sweeper or gateway; 0: none")
    metrics_public: bool = Field(True, description="The gateway also serves /metrics on its public port")

    # --- presence, typing, read state
    presence_ttl_s: float = Field(30.0, gt=0, description="A dead gateway's users go offline within this")
    typing_interval_s: float = Field(3.0, gt=0, description="At most one typing signal per user and room this often")
    receipts_max_online: int = Field(
        50, ge=0, description="Read receipts go to the room's other members while at most this many are online"
    )
    reads_linger_ms: int = Field(100, ge=0, description="Read marks gathered this long, then stored in one batch")

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    def model_post_init(self, __context: object) -> None:
        if self.flush_chunk > self.buffer_cap:
            raise ValueError("flush_chunk must not exceed buffer_cap")

    def unsafe_secret(self) -> str | None:
        """Why the JWT secret must not sign production tokens, or None when it is fine."""
        secret = self.jwt_secret.get_secret_value()
        if self.dev_mode:
            return None
        if secret == DEV_JWT_SECRET or "REPLACE-ME" in secret:
            return "JWT_SECRET is the development default or a placeholder; set a real secret (or DEV_MODE=true)"
        if len(secret) < 32:
            return "JWT_SECRET is shorter than 32 bytes"
        return None

    def to_env(self) -> dict[str, str]:
        """These settings as the environment of a child process."""
        env = {}
        for key, value in self.model_dump().items():
            if value is None:
                continue  # (unset: the child's default, None, too)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[key.upper()] = str(value)
        return env

    @property
    def name(self) -> str:
        return self.node_id or f"{self.host}:{self.port}"
