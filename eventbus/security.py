"""SASL and TLS settings for every Kafka client, and the secrets they need.

One `KafkaSecurity` is built per process from the command line (`add_options` /
`from_args`, the `--kafka-*` options of every command that talks to Kafka) and handed
to each client: the event publisher, the rollout follower, `vigil events tail`,
alerting, the rollout controller and the stream processors. `client_kwargs()` gives the
keyword arguments for aiokafka's producer, consumer and admin client; an empty
`KafkaSecurity` gives none, so a plaintext broker is talked to exactly as before.

- SASL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, with a user name and a password.
- TLS: the broker's CA (a PEM file; without one the system's CAs), and for mutual TLS a
  client certificate and key (the key may be encrypted, with its own password).
- The security protocol follows from what is set (SASL_SSL with a mechanism, SSL with
  TLS files, PLAINTEXT otherwise) unless --kafka-security-protocol says otherwise; SASL
  therefore runs over TLS unless SASL_PLAINTEXT is asked for by name.

Passwords never come from the command line (a process's arguments are visible to every
user of the machine): from a file (`--kafka-sasl-password-file`) or from the environment
(`VIGIL_KAFKA_SASL_PASSWORD`). They are held as `Secret`, whose repr and str hide them,
so a logged or printed options object never shows one.

Every inconsistency is a `KafkaSecurityError` (a ValueError) whose message starts with
the option at fault, raised when the settings are built, before any client starts.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
PASSWORD_ENV = "VIGIL_KAFKA_SASL_PASSWORD"
KEY_PASSWORD_ENV = "VIGIL_KAFKA_SSL_KEY_PASSWORD"


class KafkaSecurityError(ValueError):
    """Inconsistent or unreadable Kafka security settings; the message names the option."""


class Secret:
    """A password or key that must not be shown: repr and str hide it, `reveal()` gives it."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = ""):
        self._value = value
        self.source = source  # where it came from ("file /run/secrets/kafka", "$VIGIL_..."), never the value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(hidden{', from ' + self.source if self.source else ''})"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)

    def __reduce__(self):  # a pickled options object must not carry the secret either
        raise TypeError("a Secret cannot be pickled")


def read_secret(option: str, path: str = "", env: str = "", environ=None) -> Secret | None:
    """The secret in file `path` (option `option`) or in environment variable `env`;
    None when neither is set. Both set is an error, as is an unreadable or empty file.
    One trailing newline of the file is dropped (what `echo secret > file` leaves)."""
    environ = os.environ if environ is None else environ
    from_env = environ.get(env, "") if env else ""
    if path and from_env:
        raise KafkaSecurityError(f"{option}: set either it or ${env}, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise KafkaSecurityError(f"{option}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        value = value.removesuffix("\n").removesuffix("\r")
        if not value:
            raise KafkaSecurityError(f"{option}: {path} is empty")
        return Secret(value, f"file {path}")
    if from_env:
        return Secret(from_env, f"${env}")
    return None


@dataclass(frozen=True)
class KafkaSecurity:
    security_protocol: str = ""       # empty: derived from what else is set
    sasl_mechanism: str = ""          # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: Secret | None = None
    ssl_cafile: str = ""              # PEM; empty with TLS: the system's CAs
    ssl_certfile: str = ""            # client certificate (PEM) for mutual TLS
    ssl_keyfile: str = ""             # its key (PEM); may be in the certificate file instead
    ssl_key_password: Secret | None = None
    ssl_check_hostname: bool = True
    _context: list = field(default_factory=list, init=False, repr=False, compare=False)  # the SSLContext, once built

    def __post_init__(self):
        self.check()

    # -- what the settings mean ----------------------------------------------------------

    @property
    def protocol(self) -> str:
        if self.security_protocol:
            return self.security_protocol
        tls = bool(self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile)
        if self.sasl_mechanism:
            return "SASL_SSL"
        return "SSL" if tls else "PLAINTEXT"

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def describe(self) -> str:
        """One line for a start-up banner: no secret, no file contents."""
        parts = [self.protocol]
        if self.uses_sasl:
            parts.append(f"{self.sasl_mechanism} as {self.sasl_username}")
        if self.uses_tls:
            parts.append(f"CA {self.ssl_cafile or 'system'}")
            if self.ssl_certfile:
                parts.append(f"client certificate {self.ssl_certfile}")
        return ", ".join(parts)

    # -- checks ----------------------------------------------------------------------------

    def check(self) -> None:
        p, m = self.security_protocol, self.sasl_mechanism
        if p and p not in PROTOCOLS:
            raise KafkaSecurityError(f"--kafka-security-protocol: {p!r} is not one of {', '.join(PROTOCOLS)}")
        if m and m not in MECHANISMS:
            raise KafkaSecurityError(f"--kafka-sasl-mechanism: {m!r} is not one of {', '.join(MECHANISMS)}")
        if p in ("SASL_PLAINTEXT", "SASL_SSL") and not m:
            raise KafkaSecurityError(f"--kafka-sasl-mechanism: required with --kafka-security-protocol {p}")
        if m and p in ("PLAINTEXT", "SSL"):
            raise KafkaSecurityError(f"--kafka-security-protocol: {p} carries no SASL, but --kafka-sasl-mechanism "
                                     f"is {m}; use SASL_SSL or SASL_PLAINTEXT")
        if m and not self.sasl_username:
            raise KafkaSecurityError(f"--kafka-sasl-username: required with --kafka-sasl-mechanism {m}")
        if m and not self.sasl_password:
            raise KafkaSecurityError(f"--kafka-sasl-password-file (or ${PASSWORD_ENV}): required with "
                                     f"--kafka-sasl-mechanism {m}")
        if not m and self.sasl_username:
            raise KafkaSecurityError("--kafka-sasl-mechanism: required with --kafka-sasl-username")
        if not m and self.sasl_password:
            raise KafkaSecurityError(f"--kafka-sasl-mechanism: required with a SASL password "
                                     f"({self.sasl_password.source or 'given'})")
        tls_files = [(o, v) for o, v in (("--kafka-ssl-cafile", self.ssl_cafile),
                                         ("--kafka-ssl-certfile", self.ssl_certfile),
                                         ("--kafka-ssl-keyfile", self.ssl_keyfile)) if v]
        if tls_files and not self.uses_tls:
            raise KafkaSecurityError(f"--kafka-security-protocol: {self.protocol} does not use TLS, but "
                                     f"{tls_files[0][0]} is set; use SSL or SASL_SSL")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise KafkaSecurityError("--kafka-ssl-certfile: required with --kafka-ssl-keyfile")
        if self.ssl_key_password and not self.ssl_certfile:
            raise KafkaSecurityError("--kafka-ssl-certfile: required with a key password "
                                     f"({self.ssl_key_password.source or 'given'})")
        for option, path in tls_files:
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise KafkaSecurityError(f"{option}: cannot read {path}")
        if self.uses_tls:
            self.ssl_context()  # load the files now: a bad one stops the start, naming its option
        if m == "PLAIN" and self.protocol == "SASL_PLAINTEXT":
            log.warning("Kafka SASL PLAIN over SASL_PLAINTEXT sends the password unencrypted; "
                        "use SASL_SSL outside a trusted network")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context shared by every client of this process; None without TLS."""
        if not self.uses_tls:
            return None
        if self._context:
            return self._context[0]
        try:  # the CA file alone where one is given, else the system's CAs
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ssl_cafile or None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            where = f"{self.ssl_cafile} holds no usable PEM certificate" if self.ssl_cafile else "the system's CAs"
            raise KafkaSecurityError(f"--kafka-ssl-cafile: {where} ({exc})") from None
        if self.ssl_certfile:
            password = self.ssl_key_password.reveal() if self.ssl_key_password else None
            try:
                ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None, password=password)
            except (ssl.SSLError, OSError, ValueError) as exc:
                option = "--kafka-ssl-keyfile" if self.ssl_keyfile else "--kafka-ssl-certfile"
                raise KafkaSecurityError(f"{option}: cannot load the client certificate and key "
                                         f"({getattr(exc, 'reason', None) or exc}); a wrong key password, "
                                         "a key that does not match the certificate, or not PEM") from None
        ctx.check_hostname = self.ssl_check_hostname
        self._context.append(ctx)
        return ctx

    # -- for aiokafka ----------------------------------------------------------------------

    def client_kwargs(self) -> dict:
        """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
        protocol = self.protocol
        if protocol == "PLAINTEXT":
            return {}
        kwargs: dict = {"security_protocol": protocol}
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.reveal()
        return kwargs

    def env(self) -> dict[str, str]:
        """The settings as the VIGIL_KAFKA_* variables the options read, for child
        processes (`vigil up`): the password goes as a file path where it came from one,
        else in the variable it came from."""
        out = {
            "VIGIL_KAFKA_SECURITY_PROTOCOL": self.security_protocol,
            "VIGIL_KAFKA_SASL_MECHANISM": self.sasl_mechanism,
            "VIGIL_KAFKA_SASL_USERNAME": self.sasl_username,
            "VIGIL_KAFKA_SSL_CAFILE": self.ssl_cafile,
            "VIGIL_KAFKA_SSL_CERTFILE": self.ssl_certfile,
            "VIGIL_KAFKA_SSL_KEYFILE": self.ssl_keyfile,
            "VIGIL_KAFKA_SSL_NO_HOSTNAME_CHECK": "" if self.ssl_check_hostname else "1",
        }
        for secret, file_var, env_var in ((self.sasl_password, "VIGIL_KAFKA_SASL_PASSWORD_FILE", PASSWORD_ENV),
                                          (self.ssl_key_password, "VIGIL_KAFKA_SSL_KEY_PASSWORD_FILE",
                                           KEY_PASSWORD_ENV)):
            if secret is not None and secret.source.startswith("file "):
                out[file_var] = secret.source.removeprefix("file ")
            elif secret is not None:
                out[env_var] = secret.reveal()
        return {k: v for k, v in out.items() if v}


NONE = KafkaSecurity()


# -- command line --------------------------------------------------------------------------


def add_options(parser, option) -> None:
    """The --kafka-* options, in a group of their own; `option` is vigil.cli's helper
    (each option also read from its VIGIL_ environment variable)."""
    g = parser.add_argument_group(
        "Kafka security", "SASL and TLS for brokers that need them; passwords come from a file or "
        f"${PASSWORD_ENV} / ${KEY_PASSWORD_ENV}, never from the command line")
    option(g, "--kafka-security-protocol", default="", choices=("", *PROTOCOLS),
           help="empty: SASL_SSL with a SASL mechanism, SSL with TLS files, else PLAINTEXT")
    option(g, "--kafka-sasl-mechanism", default="", choices=("", *MECHANISMS), help="SASL mechanism")
    option(g, "--kafka-sasl-username", default="", help="SASL user name")
    option(g, "--kafka-sasl-password-file", default="",
           help=f"file holding the SASL password (or set ${PASSWORD_ENV})")
    option(g, "--kafka-ssl-cafile", default="", help="CA certificate(s) of the brokers, PEM; empty: the system's")
    option(g, "--kafka-ssl-certfile", default="", help="client certificate, PEM, for mutual TLS")
    option(g, "--kafka-ssl-keyfile", default="", help="client key, PEM (may be in the certificate file)")
    option(g, "--kafka-ssl-key-password-file", default="",
           help=f"file holding the client key's password (or set ${KEY_PASSWORD_ENV})")
    option(g, "--kafka-ssl-no-hostname-check", action="store_true",
           help="do not check that the broker's certificate names its host (the chain is still verified)")


def from_args(args, environ=None) -> KafkaSecurity:
    """KafkaSecurity from the parsed --kafka-* options (a command without them gets the
    empty one); KafkaSecurityError names the option at fault."""
    a = {name: getattr(args, "kafka_" + name, "") for name in (
        "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password_file", "ssl_cafile",
        "ssl_certfile", "ssl_keyfile", "ssl_key_password_file")}
    return KafkaSecurity(
        security_protocol=a["security_protocol"], sasl_mechanism=a["sasl_mechanism"],
        sasl_username=a["sasl_username"],
        sasl_password=read_secret("--kafka-sasl-password-file", a["sasl_password_file"], PASSWORD_ENV, environ),
        ssl_cafile=a["ssl_cafile"], ssl_certfile=a["ssl_certfile"], ssl_keyfile=a["ssl_keyfile"],
        ssl_key_password=read_secret("--kafka-ssl-key-password-file", a["ssl_key_password_file"],
                                     KEY_PASSWORD_ENV, environ),
        ssl_check_hostname=not getattr(args, "kafka_ssl_no_hostname_check", False))
