"""Configuration from environment variables (every one is in the README's table), validated at start
by pydantic-settings: a mistake is one readable line naming the variable, never a traceback.

`Settings(...)` takes the same values by field name (tests build it that way); the environment
fills in what is not given."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from clients.channel import is_loopback_host
from server.api.auth import TokenConfigError, parse_tokens
from server.domain.aba import Originator

ENV_PREFIX = "PAYMENTS_"

# Amounts are integer cents: a currency whose minor unit is not a hundredth cannot be booked as such
# (Stripe's zero-decimal and three-decimal currencies).
ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())
POSTGRES_SCHEMES = ("postgresql+psycopg2", "postgresql", "postgres")


class ConfigError(ValueError):
    """Settings that cannot start the service: one line per mistake in `lines`."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def split_addr(addr: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` → (host, port); ValueError with a readable reason."""
    host, sep, port_text = addr.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{addr!r} is not host:port (like 127.0.0.1:50051 or [::]:50051)")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range (0 to 65535)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{addr!r} is not host:port: an IPv6 address goes in brackets, [::1]:50051")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{addr!r} is not host:port: an IPv6 address goes in brackets, [::1]:50051")
    return host, port


def normalise_database_url(url: str) -> str:
    """`postgres://` and `postgresql://` (libpq's forms, multi-host included) become SQLAlchemy's
    `postgresql+psycopg2://`; any other scheme is refused: the service runs on PostgreSQL only."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or not rest:
        raise ValueError("is not a URL: give postgresql://user@host:5432/database")
    if scheme.lower() not in POSTGRES_SCHEMES:
        raise ValueError(f"has the scheme {scheme!r}: the service runs on PostgreSQL only "
                         "(postgresql://user@host:5432/database)")
    return f"postgresql+psycopg2://{rest}"


def database_label(url: str) -> str:
    """The database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse still gets a message
        return "PAYMENTS_DATABASE_URL"


def _readable_file(value: Path | None, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} {str(path)!r} cannot be read by this user")
    return path


class _EnvWithoutTestHooks(EnvSettingsSource):
    """The environment, except `extra` (a tests-only dict of event-hub limits) and `aba` (built from
    the PAYMENTS_ABA_* variables by `aba_from_env`)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in ("extra", "aba"):
            return None, field_name, False
        return super().get_field_value(field, field_name)


def _env(name: str) -> Any:  # noqa: ANN401 - Field(...) returns Any
    """A field read from an environment variable without the PAYMENTS_ prefix (Stripe's names);
    the field name works as a keyword too."""
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True, populate_by_name=True,
        env_ignore_empty=True, case_sensitive=False, hide_input_in_errors=True, arbitrary_types_allowed=True,
    )

    # unset is allowed here: `make run` starts a local PostgreSQL and sets it; payments-server asks for it
    database_url: str | None = Field(None, repr=False)
    grpc_addr: str = "127.0.0.1:50051"
    auth_tokens: str = Field("", repr=False)
    currency: str = "aud"
    timezone: str = "Australia/Sydney"
    stripe_secret_key: str = Field("", repr=False, validation_alias=_env("STRIPE_SECRET_KEY"))
    stripe_api_base: str = Field("", validation_alias=_env("STRIPE_API_BASE"))
    stripe_webhook_secret: str = Field("", repr=False, validation_alias=_env("STRIPE_WEBHOOK_SECRET"))
    db_pool_size: int = Field(16, ge=1, le=1000)
    db_threads: int = Field(16, ge=1, le=1000)
    event_retention_days: int = Field(30, ge=1, le=3650)
    event_poll_interval_ms: int = Field(1000, ge=10, le=3_600_000)  # the event stream's poll when no wake-up comes
    shutdown_grace_s: int = Field(5, ge=0, le=3600)
    lock_timeout_ms: int = Field(2_000, ge=1, le=600_000)  # how long a statement waits for a row lock
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"  # "asyncio": the standard library's loop
    grpc_accept_ahead: int = Field(8, ge=0, le=64)  # requests for a method's next call kept open (0: off)
    reconcile_interval_ms: int = Field(5_000, ge=0, le=3_600_000)  # pending card operations settled with Stripe (0: never)
    reconcile_min_age_s: int = Field(60, ge=0, le=86_400)  # a pending card operation younger belongs to its request
    card_intent_ttl_s: int = Field(86_400, ge=60, le=30 * 86_400)  # an unpaid PaymentIntent is cancelled after this
    max_in_flight: int = Field(256, ge=1, le=100_000)  # unary calls handled at once; beyond: RESOURCE_EXHAUSTED
    db_wait_s: int = Field(0, ge=0, le=3600)  # at start, how long to wait for an unreachable database
    health_probe_ms: int = Field(500, ge=50, le=60_000)  # how often health asks the database (its own connection)
    migrate_at_start: bool = True  # apply Alembic migrations before serving (else `payments-server migrate`)
    # TLS: a certificate and its key turn it on; a client CA makes it mutual (clients must present a
    # certificate it signed)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    allow_insecure: bool = False  # serve without TLS on an address other than loopback
    metrics_addr: str = ""  # host:port of the Prometheus endpoint; empty: off
    # HTTP/2 keepalive and connection age, for long Subscribe streams behind load balancers
    grpc_keepalive_time_s: int = Field(30, ge=1, le=7200)
    grpc_keepalive_timeout_s: int = Field(10, ge=1, le=600)
    grpc_max_connection_age_s: int = Field(1800, ge=0, le=604_800)  # 0: connections never age out
    grpc_max_connection_age_grace_s: int = Field(300, ge=0, le=86_400)
    extra: dict = Field(default_factory=dict, exclude=True)  # tests only: event-hub limits
    aba: Originator | None = None  # the federation as sender of settlement bank files (aba_from_env)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvWithoutTestHooks(settings_cls)

    # ---- one field at a time
    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else normalise_database_url(value)

    @field_validator("grpc_addr")
    @classmethod
    def _grpc_addr(cls, value: str) -> str:
        split_addr(value)
        return value.strip()

    @field_validator("metrics_addr")
    @classmethod
    def _metrics_addr(cls, value: str) -> str:
        if value.strip():
            split_addr(value)
        return value.strip()

    @field_validator("auth_tokens")
    @classmethod
    def _auth_tokens(cls, value: str) -> str:
        try:
            parse_tokens(value)
        except TokenConfigError as exc:
            raise ValueError(str(exc).replace("PAYMENTS_AUTH_TOKENS ", "")) from None
        return value

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        code = value.strip().lower()
        if not re.fullmatch(r"[a-z]{3}", code):
            raise ValueError("is not a three-letter ISO 4217 currency code (like aud)")
        if code in ZERO_DECIMAL or code in THREE_DECIMAL:
            raise ValueError(f"{code} has no cents (its minor unit is not a hundredth); amounts here are cents")
        return code

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("is not a time zone of the IANA database (like Australia/Sydney or UTC)") from None
        return value.strip()

    @field_validator("event_loop", mode="before")
    @classmethod
    def _event_loop(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("stripe_secret_key")
    @classmethod
    def _stripe_key(cls, value: str) -> str:
        if value and not value.startswith(("sk_", "rk_")):
            raise ValueError("is not a Stripe secret key (sk_… or a restricted rk_…)")
        return value

    @field_validator("stripe_api_base")
    @classmethod
    def _stripe_api_base(cls, value: str) -> str:
        if value and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value.strip()):
            raise ValueError("is not an http(s) URL (like http://127.0.0.1:8420)")
        return value.strip().rstrip("/")

    @field_validator("tls_cert_file")
    @classmethod
    def _cert(cls, value: Path | None) -> Path | None:
        return _readable_file(value, "the certificate")

    @field_validator("tls_key_file")
    @classmethod
    def _key(cls, value: Path | None) -> Path | None:
        return _readable_file(value, "the key")

    @field_validator("tls_client_ca_file")
    @classmethod
    def _client_ca(cls, value: Path | None) -> Path | None:
        return _readable_file(value, "the client CA")

    # ---- the fields together
    @model_validator(mode="after")
    def _together(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("PAYMENTS_TLS_CERT_FILE and PAYMENTS_TLS_KEY_FILE go together: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("PAYMENTS_TLS_CLIENT_CA_FILE (mutual TLS) needs PAYMENTS_TLS_CERT_FILE and "
                             "PAYMENTS_TLS_KEY_FILE too")
        host, _ = split_addr(self.grpc_addr)
        if not self.tls and not self.allow_insecure and not is_loopback_host(host):
            raise ValueError(
                f"PAYMENTS_GRPC_ADDR={self.grpc_addr} is not a loopback address and TLS is off: bearer tokens "
                "would cross the network in the clear. Set PAYMENTS_TLS_CERT_FILE and PAYMENTS_TLS_KEY_FILE, or "
                "PAYMENTS_ALLOW_INSECURE=true where something else encrypts the traffic")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment, or ConfigError with one line per mistake."""
        lines: list[str] = []
        try:
            aba = aba_from_env()
        except ConfigError as exc:
            aba, lines = None, exc.lines
        try:
            settings = cls(aba=aba)
        except ValidationError as exc:
            raise ConfigError(describe(exc) + lines) from None
        if lines:
            raise ConfigError(lines)
        return settings


# ---------------------------------------------------------------- settlement bank files (ABA)
# The federation's Direct Entry details, for the ABA file of every real settlement. Unset
# (PAYMENTS_ABA_USER_ID empty): settlements carry no ABA file. Set: every one must be valid.
ABA_ENV = {
    "user_id": "PAYMENTS_ABA_USER_ID",  # APCA Direct Entry user id, six digits
    "bank": "PAYMENTS_ABA_BANK",  # the federation's bank, three-letter mnemonic (CBA, WBC, NAB, ANZ, ...)
    "user_name": "PAYMENTS_ABA_USER_NAME",  # name of the user as the bank knows it (26 characters kept)
    "bsb": "PAYMENTS_ABA_BSB",  # the federation's account debited for the file's total: ddd-ddd
    "account_number": "PAYMENTS_ABA_ACCOUNT_NUMBER",  # up to 9 digits
    "account_name": "PAYMENTS_ABA_ACCOUNT_NAME",  # its title (32 characters kept)
    "description": "PAYMENTS_ABA_DESCRIPTION",  # entries' description (12 kept), default SETTLEMENT
    "remitter": "PAYMENTS_ABA_REMITTER",  # remitter on the clubs' statements (16 kept), default the user name
}


def aba_from_env() -> Originator | None:
    """The federation's sender details from PAYMENTS_ABA_*, or None when PAYMENTS_ABA_USER_ID is unset;
    ConfigError (one line per problem) when they are set but wrong: a bank file with wrong sender
    details would be refused by the bank, after the money moved."""
    env = {key: (os.environ.get(name) or "").strip() for key, name in ABA_ENV.items()}
    if not env["user_id"]:
        return None
    originator = Originator(
        user_id=env["user_id"], bank=env["bank"].upper(), user_name=env["user_name"], bsb=env["bsb"],
        account_number=env["account_number"], account_name=env["account_name"] or env["user_name"],
        description=env["description"] or "SETTLEMENT", remitter=env["remitter"],
    )
    problems = originator.problems()
    if problems:
        raise ConfigError([f"PAYMENTS_ABA_* settings: {problem}" for problem in problems])
    return originator


def _field_of(model: type[BaseSettings], loc: str) -> str:
    """The field an error's location names (a field name, or an alias such as STRIPE_SECRET_KEY)."""
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if name == loc or (isinstance(alias, AliasChoices) and loc.upper() in (str(a).upper() for a in alias.choices)):
            return name
    return loc


def env_name(field: str, model: type[BaseSettings] | None = None) -> str:
    """The environment variable of a field."""
    model = model or Settings
    info = model.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0]).upper()
    return f"{model.model_config.get('env_prefix', '')}{field.upper()}"


_PLAIN = {  # pydantic's error types, said the way the README's table says them
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_parsing": "must be true or false",
    "literal_error": "must be one of {expected}",
}


def _message(error: dict) -> str:
    plain = _PLAIN.get(error["type"])
    if plain is not None:
        try:
            return plain.format(**error.get("ctx", {}))
        except (KeyError, IndexError):
            pass
    return str(error["msg"]).removeprefix("Value error, ")


def describe_errors(exc: ValidationError, model: type[BaseSettings]) -> list[str]:
    """One line per mistake: the variable, its value (never for a secret) and what is wrong."""
    lines = []
    for error in exc.errors(include_url=False):
        message = _message(error)
        loc = [str(part) for part in error.get("loc", ())]
        if not loc:  # a rule about several settings: its message names them
            lines.append(message)
            continue
        field = _field_of(model, loc[0])
        info = model.model_fields.get(field)
        name = env_name(field, model) if info is not None else field.upper()
        value = error.get("input")
        if error["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown setting")
        elif (info is not None and info.repr is False) or isinstance(value, dict) or value is None:
            lines.append(f"{name}: {message}")
        else:
            lines.append(f"{name}={value}: {message}")
    return lines


def describe(exc: ValidationError) -> list[str]:
    return describe_errors(exc, Settings)
