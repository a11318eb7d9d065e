"""Price book and pricing: rates, window boundaries, midnight, timezones, DST, spot, memory (pure)."""

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from oppen.cost.price_book import OffPeak, PriceBook, Rates, Resources, load_price_book, on_demand_hourly_usd
from oppen.cost.pricing import price_interval
from oppen.cost.windows import next_off_peak_start, off_peak_seconds

UTC = timezone.utc
BOOK = PriceBook()
ONE_GPU = Resources(gpus=1, cpu_cores=4, memory_gib=16)


def at(hour, minute=0, day=2, tz=UTC):
    return datetime(2026, 3, day, hour, minute, tzinfo=tz)


def test_shipped_book_has_the_seed_rates():
    book = load_price_book()
    assert (book.rates.gpu_hour_usd, book.rates.cpu_core_hour_usd, book.rates.memory_gib_hour_usd) == (0.25, 0.05, 0.0)
    assert book.off_peak.discount == 0.5 and book.spot.discount == 0.7 and book.spot.interruptions_per_hour == 0.05


def test_hourly_rate_sums_gpus_cores_memory_and_gpu_types():
    book = PriceBook(rates=Rates(memory_gib_hour_usd=0.01, gpu_type_hour_usd={"h100": 2.5}))
    assert on_demand_hourly_usd(book, ONE_GPU) == pytest.approx(0.25 + 4 * 0.05 + 16 * 0.01)
    assert on_demand_hourly_usd(book, ONE_GPU.model_copy(update={"gpu_type": "h100"})) == pytest.approx(2.5 + 0.2 + 0.16)


def test_peak_hour_costs_the_full_rate():
    cost = price_interval(BOOK, ONE_GPU, at(12), at(13))
    assert cost.usd == pytest.approx(0.45) and cost.off_peak_seconds == 0


def test_interval_straddling_22h_is_split_exactly():
    cost = price_interval(BOOK, ONE_GPU, at(21, 30), at(22, 30))
    assert cost.peak_seconds == 1800 and cost.off_peak_seconds == 1800
    assert cost.usd == pytest.approx(0.45 * 0.5 + 0.45 * 0.5 * 0.5)


def test_interval_across_midnight_and_the_6h_boundary():
    assert off_peak_seconds(BOOK.off_peak, at(23), at(7, day=3)) == 7 * 3600
    assert off_peak_seconds(BOOK.off_peak, at(5, 30), at(6, 30)) == 1800


def test_multi_day_interval_counts_every_night():
    assert off_peak_seconds(BOOK.off_peak, at(12), at(12, day=5)) == 3 * 8 * 3600


def test_window_is_in_its_own_timezone():
    berlin = BOOK.model_copy(update={"off_peak": OffPeak(timezone="Europe/Berlin")})
    # 21:00-22:00 UTC on 2 March is 22:00-23:00 in Berlin (UTC+1): all off-peak there.
    assert off_peak_seconds(berlin.off_peak, at(21), at(22)) == 3600
    assert off_peak_seconds(BOOK.off_peak, at(21), at(22)) == 0


def test_dst_night_windows_last_their_real_length():
    berlin = OffPeak(timezone="Europe/Berlin")
    zone = ZoneInfo("Europe/Berlin")
    # Spring forward on 29 March 2026: 22:00 -> 06:00 local is only 7 real hours.
    spring = off_peak_seconds(berlin, datetime(2026, 3, 28, 20, tzinfo=zone), datetime(2026, 3, 29, 8, tzinfo=zone))
    assert spring == 7 * 3600
    # Fall back on 25 October 2026: 9 real hours.
    autumn = off_peak_seconds(berlin, datetime(2026, 10, 24, 20, tzinfo=zone), datetime(2026, 10, 25, 8, tzinfo=zone))
    assert autumn == 9 * 3600


def test_spot_takes_its_discount_on_top_of_off_peak():
    cost = price_interval(BOOK, ONE_GPU, at(23), at(23, 30, day=2), spot=True)
    assert cost.usd == pytest.approx(0.45 * 0.5 * 0.5 * 0.3)
    assert cost.saving_usd == pytest.approx(0.45 * 0.5 - cost.usd)


def test_next_off_peak_start():
    assert next_off_peak_start(BOOK.off_peak, at(12)) == at(22)
    assert next_off_peak_start(BOOK.off_peak, at(23)) == at(23)
    assert next_off_peak_start(BOOK.off_peak, at(6, 0)) == at(22)


@pytest.mark.parametrize(
    "off_peak, message",
    [
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"start": "25:00"}, "time"),
        ({"start": "22:00", "end": "22:00"}, "empty"),
        ({"discount": 1.5}, "less than 1"),
    ],
)
def test_malformed_windows_are_rejected(off_peak, message):
    with pytest.raises(ValidationError, match=message):
        OffPeak(**off_peak)


def test_malformed_price_book_files_are_rejected(tmp_path, monkeypatch):
    bad = tmp_path / "book.yaml"
    bad.write_text("rates: {gpu_hour_usd: -1}\n")
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        load_price_book(bad)
    bad.write_text("rates: {gpu_per_hour: 1}\n")
    monkeypatch.setenv("OPPEN_PRICE_BOOK", str(bad))
    with pytest.raises(ValidationError, match="Extra inputs"):
        load_price_book()
    with pytest.raises(ValueError, match="cannot be read"):
        load_price_book(tmp_path / "missing.yaml")


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError, match="no timezone"):
        price_interval(BOOK, ONE_GPU, datetime(2026, 1, 1), datetime(2026, 1, 1) + timedelta(hours=1))


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York"])
def test_the_meters_price_cursor_gives_exactly_what_the_exact_split_gives(zone):
    """Short steps, long gaps, window edges and a DST change (8 March in New York, 29 March in Berlin)."""
    import random

    from oppen.cost.price_book import OffPeak
    from oppen.cost.pricing import PriceCursor

    book = PriceBook(off_peak=OffPeak(timezone=zone))
    resources = Resources(gpus=1, cpu_cores=4)
    cursor = PriceCursor(book, resources, spot=True)
    moment, rng = datetime(2026, 3, 7, 20, 0, tzinfo=timezone.utc), random.Random(7)
    for _ in range(5000):
        end = moment + timedelta(seconds=rng.choice([0.01, 0.5, 7.0, 600.0, 5 * 3600.0]))
        fast, exact = cursor.price(moment, end), price_interval(book, resources, moment, end, spot=True)
        assert fast.usd == pytest.approx(exact.usd, rel=1e-12, abs=1e-18)
        assert (fast.peak_seconds, fast.off_peak_seconds) == (exact.peak_seconds, exact.off_peak_seconds)
        moment = end
