"""Settings from the environment (prefix ``OMNILOYAL_``); embedded stores by default."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMNILOYAL_", extra="ignore")

    database_url: str = "sqlite:///./data/omniloyal.db"
    warehouse_url: str = "duckdb:///./data/warehouse.duckdb"
    bus_url: str = "memory://"
    # Region used to read phone numbers written without a country code ("8 912 ...").
    default_phone_region: str = "RU"
    default_currency: str = "bonus"
    # Time zone of the retailer's head office: used where a member or store has none.
    default_timezone: str = "Europe/Moscow"
    host: str = "127.0.0.1"
    port: int = 8000
    # How often the embedded server runs the ledger jobs (expiry, activation records).
    ledger_job_interval_seconds: int = Field(default=60, ge=1)
    # Seconds an API key lookup is cached in-process (keys revoked take this long to stop working).
    auth_cache_seconds: int = Field(default=30, ge=0)
    # One log line per HTTP request (uvicorn's access log). A till or tracker deployment behind a
    # proxy that logs requests can turn it off: it is ~15% of the HTTP layer's CPU.
    access_log: bool = True
    require_services: bool = False
    # Run the outbox dispatcher and the event consumers inside `serve` (embedded). Production sets
    # it to false and runs `omniloyal worker` processes, so tills never share a CPU with the sinks.
    run_workers: bool = True
    # How long an event consumer waits, once a first event is there, for more to fill its batch.
    # Sinks pay a fixed cost per batch (a warehouse transaction): at a till's pace of a few
    # purchases a second, waiting a little makes that cost shared by many events instead of
    # paid for each. It adds at most this much to the event -> profile/segment latency.
    # Rebuild every dynamic segment this often (minutes; 0: never), for the conditions that time
    # alone makes true ("no purchase for 30 days"): events keep segments fresh in seconds.
    segments_refresh_minutes: int = Field(default=15, ge=0)
    # Recompute RFM scores of every member this often (hours; 0: never): recency ages daily.
    rfm_recompute_hours: int = Field(default=24, ge=0)
    consumer_linger_ms: int = Field(default=500, ge=0, le=10_000)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
