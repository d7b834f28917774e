#!/usr/bin/env python3
"""Generate a realistic-looking world rate deck (fixed seed, so the output never changes).

    python rates/generate_world_deck.py                       # rewrites rates/sample-world.csv
    python rates/generate_world_deck.py --rows 1000000 --out /tmp/deck-1m.csv

Every country gets a fixed-line row, a few mobile ranges and sometimes a blocked premium range;
a handful of them get peak/off-peak windows and a scheduled price change. ``--rows N`` pads the
deck with unique longer prefixes (area and operator ranges) up to N rows, for benchmarks.
Prices are invented; the country codes are real E.164 codes.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from agent.core.money import format_amount

SEED = 20260131
HEADER = ("prefix", "destination", "rate", "connect_fee", "initial_increment", "increment", "minimum",
          "grace", "effective_from", "effective_to", "weekdays", "time_from", "time_to", "blocked")
PRICE_CHANGE_AT = "2026-07-01T00:00:00Z"

COUNTRIES = """
1 United States/Canada|1242 Bahamas|1246 Barbados|1264 Anguilla|1268 Antigua and Barbuda
1284 British Virgin Islands|1340 US Virgin Islands|1345 Cayman Islands|1441 Bermuda|1473 Grenada
1649 Turks and Caicos|1664 Montserrat|1670 Northern Mariana Islands|1671 Guam|1684 American Samoa
1721 Sint Maarten|1758 Saint Lucia|1767 Dominica|1784 Saint Vincent|1787 Puerto Rico|1809 Dominican Republic
1868 Trinidad and Tobago|1869 Saint Kitts and Nevis|1876 Jamaica|20 Egypt|211 South Sudan|212 Morocco
213 Algeria|216 Tunisia|218 Libya|220 Gambia|221 Senegal|222 Mauritania|223 Mali|224 Guinea
225 Ivory Coast|226 Burkina Faso|227 Niger|228 Togo|229 Benin|230 Mauritius|231 Liberia
232 Sierra Leone|233 Ghana|234 Nigeria|235 Chad|236 Central African Republic|237 Cameroon
238 Cape Verde|239 Sao Tome and Principe|240 Equatorial Guinea|241 Gabon|242 Congo|243 DR Congo
244 Angola|245 Guinea-Bissau|248 Seychelles|249 Sudan|250 Rwanda|251 Ethiopia|252 Somalia
253 Djibouti|254 Kenya|255 Tanzania|256 Uganda|257 Burundi|258 Mozambique|260 Zambia
261 Madagascar|262 Reunion|263 Zimbabwe|264 Namibia|265 Malawi|266 Lesotho|267 Botswana
268 Eswatini|269 Comoros|27 South Africa|290 Saint Helena|291 Eritrea|297 Aruba|298 Faroe Islands
299 Greenland|30 Greece|31 Netherlands|32 Belgium|33 France|34 Spain|350 Gibraltar|351 Portugal
352 Luxembourg|353 Ireland|354 Iceland|355 Albania|356 Malta|357 Cyprus|358 Finland|359 Bulgaria
36 Hungary|370 Lithuania|371 Latvia|372 Estonia|373 Moldova|374 Armenia|375 Belarus|376 Andorra
377 Monaco|378 San Marino|380 Ukraine|381 Serbia|382 Montenegro|383 Kosovo|385 Croatia
386 Slovenia|387 Bosnia and Herzegovina|389 North Macedonia|39 Italy|40 Romania|41 Switzerland
420 Czech Republic|421 Slovakia|423 Liechtenstein|43 Austria|44 United Kingdom|45 Denmark
46 Sweden|47 Norway|48 Poland|49 Germany|500 Falkland Islands|501 Belize|502 Guatemala
503 El Salvador|504 Honduras|505 Nicaragua|506 Costa Rica|507 Panama|509 Haiti|51 Peru|52 Mexico
53 Cuba|54 Argentina|55 Brazil|56 Chile|57 Colombia|58 Venezuela|590 Guadeloupe|591 Bolivia
592 Guyana|593 Ecuador|594 French Guiana|595 Paraguay|596 Martinique|597 Suriname|598 Uruguay
599 Curacao|60 Malaysia|61 Australia|62 Indonesia|63 Philippines|64 New Zealand|65 Singapore
66 Thailand|670 Timor-Leste|673 Brunei|674 Nauru|675 Papua New Guinea|676 Tonga
677 Solomon Islands|678 Vanuatu|679 Fiji|680 Palau|682 Cook Islands|685 Samoa|686 Kiribati
687 New Caledonia|689 French Polynesia|691 Micronesia|692 Marshall Islands|7 Russia
76 Kazakhstan|81 Japan|82 South Korea|84 Vietnam|850 North Korea|852 Hong Kong|853 Macau
855 Cambodia|856 Laos|86 China|880 Bangladesh|886 Taiwan|90 Turkey|91 India|92 Pakistan
93 Afghanistan|94 Sri Lanka|95 Myanmar|960 Maldives|961 Lebanon|962 Jordan|963 Syria|964 Iraq
965 Kuwait|966 Saudi Arabia|967 Yemen|968 Oman|970 Palestine|971 United Arab Emirates|972 Israel
973 Bahrain|974 Qatar|975 Bhutan|976 Mongolia|977 Nepal|98 Iran|992 Tajikistan|993 Turkmenistan
994 Azerbaijan|995 Georgia|996 Kyrgyzstan|998 Uzbekistan
"""

BILLING_STEPS = ((1, 1), (1, 1), (1, 1), (30, 6), (60, 60), (60, 1), (6, 6))


def countries() -> list[tuple[str, str]]:
    pairs = []
    for entry in COUNTRIES.replace("\n", "|").split("|"):
        if entry.strip():
            code, name = entry.strip().split(" ", 1)
            pairs.append((code, name))
    return pairs


def price(rng: random.Random, base_micros: int, factor_low: float, factor_high: float) -> str:
    """A per-minute price with 4 decimals (what carriers usually publish)."""
    micros = int(base_micros * rng.uniform(factor_low, factor_high))
    return format_amount(max(100, micros // 100 * 100))


def row(prefix: str, destination: str, rate: str, *, connect_fee: str = "", steps: tuple[int, int] = (1, 1),
        minimum: int = 0, grace: int = 0, effective_from: str = "", effective_to: str = "",
        weekdays: str = "", time_from: str = "", time_to: str = "", blocked: bool = False) -> list[str]:
    return [prefix, destination, rate, connect_fee, str(steps[0]), str(steps[1]), str(minimum) if minimum else "",
            str(grace) if grace else "", effective_from, effective_to, weekdays, time_from, time_to,
            "yes" if blocked else ""]


def inside_other_country(prefix: str, code: str, nested: dict[str, list[str]]) -> bool:
    """True if ``prefix`` would cut into a longer country code that shares ``code`` (1242 in 1)."""
    return any(prefix.startswith(other) or other.startswith(prefix) for other in nested[code])


def country_rows(rng: random.Random, code: str, name: str, used: set[str],
                 nested: dict[str, list[str]]) -> Iterator[list[str]]:
    base = int(rng.lognormvariate(9.6, 1.0))  # micro-units per minute; median ~0.015
    steps = rng.choice(BILLING_STEPS)
    fee = format_amount(rng.choice((10_000, 20_000, 50_000))) if rng.random() < 0.1 else ""
    grace = rng.choice((0, 0, 0, 3, 5))
    special = rng.random()
    if special < 0.04:  # peak/off-peak: four rows that cover the week exactly once
        peak, off = price(rng, base, 1.0, 1.3), price(rng, base, 0.5, 0.8)
        yield row(code, f"{name} - Fixed Peak", peak, steps=steps, weekdays="12345", time_from="08:00",
                  time_to="20:00")
        yield row(code, f"{name} - Fixed Off-peak", off, steps=steps, weekdays="12345", time_from="00:00",
                  time_to="08:00")
        yield row(code, f"{name} - Fixed Off-peak", off, steps=steps, weekdays="12345", time_from="20:00",
                  time_to="24:00")
        yield row(code, f"{name} - Fixed Weekend", off, steps=steps, weekdays="67")
    elif special < 0.08:  # a scheduled price change
        yield row(code, f"{name} - Fixed", price(rng, base, 1.0, 1.0), steps=steps, effective_to=PRICE_CHANGE_AT)
        yield row(code, f"{name} - Fixed", price(rng, base, 0.8, 1.1), steps=steps, effective_from=PRICE_CHANGE_AT)
    else:
        yield row(code, f"{name} - Fixed", price(rng, base, 1.0, 1.0), connect_fee=fee, steps=steps, grace=grace)
    for _ in range(rng.randint(3, 30)):
        prefix = code + str(rng.randint(1, 999) if rng.random() < 0.6 else rng.randint(1, 99))
        if prefix in used or inside_other_country(prefix, code, nested):
            continue
        used.add(prefix)
        yield row(prefix, f"{name} - Mobile", price(rng, base, 2.0, 6.0), connect_fee=fee, steps=steps, grace=grace)
    if rng.random() < 0.3:
        prefix = code + "90" + str(rng.randint(0, 9))
        if prefix not in used and not inside_other_country(prefix, code, nested):
            used.add(prefix)
            yield row(prefix, f"{name} - Premium", "0", blocked=True)


def padding_rows(rng: random.Random, pairs: list[tuple[str, str]], used: set[str],
                 nested: dict[str, list[str]], count: int) -> Iterator[list[str]]:
    """Unique 8-11 digit ranges (longer than every country row, so never a duplicate of one)."""
    made = 0
    while made < count:
        code, name = rng.choice(pairs)
        prefix = code + "".join(rng.choices("0123456789", k=rng.randint(8, 11) - len(code)))
        if prefix in used or inside_other_country(prefix, code, nested):
            continue
        used.add(prefix)
        made += 1
        kind = "Mobile" if rng.random() < 0.5 else "Area"
        yield row(prefix, f"{name} - {kind}", price(rng, 15_000, 0.3, 8.0), steps=rng.choice(BILLING_STEPS))


def generate(rows: int | None, seed: int = SEED) -> Iterator[list[str]]:
    rng = random.Random(seed)
    pairs = countries()
    used = {code for code, _ in pairs}
    nested = {code: [other for other, _ in pairs if other != code and other.startswith(code)] for code, _ in pairs}
    yield list(HEADER)
    made = 0
    for code, name in pairs:
        for line in country_rows(rng, code, name, used, nested):
            if rows is not None and made >= rows:
                return
            made += 1
            yield line
    if rows is not None and rows > made:
        yield from padding_rows(rng, pairs, used, nested, rows - made)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, help="pad (or cut) the deck to this many rate rows")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sample-world.csv"),
                        help="output file, '-' for stdout (default: rates/sample-world.csv)")
    args = parser.parse_args()
    if str(args.out) == "-":
        csv.writer(sys.stdout, lineterminator="\n").writerows(generate(args.rows, args.seed))
        return
    with args.out.open("w", encoding="utf-8", newline="") as out:
        csv.writer(out, lineterminator="\n").writerows(generate(args.rows, args.seed))


if __name__ == "__main__":
    main()
