#!/usr/bin/env bash
# Generate the bundled demo speech corpus (data/demo/) in a LibriSpeech-like
# layout, using espeak-ng (speech synthesis), sox (resampling, padding, noise)
# and flac (encoding).
#
#   data/demo/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac
#   data/demo/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
#   data/demo/SPEAKERS.txt   LibriSpeech-style speaker table
#   data/demo/PHRASES.tsv    utt_id -> phrase index (0-based, see PHRASES below)
#
# The output is deterministic: running the script twice produces byte-identical
# files (given the same espeak-ng / sox / flac versions).
#
# Requirements:  apt-get install espeak-ng sox flac
# Usage:         bash data/make_demo.sh        (from any working directory)
set -euo pipefail

export LC_ALL=C

for tool in espeak-ng sox soxi flac; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "make_demo.sh: '$tool' not found (apt-get install espeak-ng sox flac)" >&2
        exit 1
    }
done

DATA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="$DATA_DIR/demo"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/demo"
mkdir -p "$STAGE"

RATE=16000
NOISE_SECONDS=40       # length of the shared noise bed that utterances slice from
NOISE_VOL=0.0001       # noise floor level (sox whitenoise vol; about -89 dBFS RMS)
LOWPASS_HZ=7000       # band limit of the speech (LibriSpeech-like MP3 roll-off)

# Sentences written for this corpus. Every speaker says every sentence; the
# phrase index (0-based position in this list) is recorded in PHRASES.tsv.
# Keep them free of digits/abbreviations so the transcript equals what is said.
PHRASES=(
    "The little boat drifted across the lake."
    "Please bring the red book back tomorrow."
    "She poured a cup of hot tea."
    "We walked along the river at sunset."
    "The old clock stopped at midnight."
    "Can you hear the birds singing?"
    "My brother likes to bake bread."
    "The train leaves every hour."
    "He couldn't find his keys anywhere."
    "A cold wind blew across the field."
    "They painted the fence green."
    "Turn left at the narrow street."
    "The children laughed at the puppy."
    "I'll meet you by the fountain."
    "Fresh snow covered the mountains."
    "Music filled the room all evening."
)
NPHRASES=${#PHRASES[@]}

# speaker|sex|espeak-ng voice+variant|pitch (-p)|speed (-s, wpm)|chapters|peak dBFS
# chapters: one id  -> all phrases in that chapter;
#           two ids -> first half of the phrases in the first, rest in the second.
SPEAKERS=(
    "1001|M|en-us|45|165|100 101|-10"
    "1002|F|en-us+f3|62|155|102|-12"
    "1003|M|en-gb-x-rp+m3|38|150|103 104|-14"
    "1004|F|en+f2|55|172|105|-11"
    "1005|F|en-gb-scotland+f4|66|160|106 107|-13"
    "1006|M|en-029+m7|33|145|108|-9"
    "1007|M|en+klatt|50|162|109 110|-12"
    "1008|F|en-us-nyc+f5|72|176|111|-14"
    "1009|M|en-gb-x-gbclan+m1|28|156|112 113|-10"
    "1010|F|en-gb-x-gbcwmd+f1|48|148|114|-13"
)

# Upper-case transcript with punctuation removed (apostrophes kept), single spaces.
transcript() {
    printf '%s' "$1" | tr '[:lower:]' '[:upper:]' | tr -cd "A-Z' " | tr -s ' '
}

# Milliseconds -> "S.mmm" seconds string.
ms_to_s() {
    printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000))
}

# One shared white-noise bed; each utterance takes a slice at its own offset,
# so the noise differs between files. `sox -R` seeds the generator with a
# fixed value, which makes it reproducible; `-D` disables (random) dither.
NOISE="$WORK/noise.wav"
sox -R -D -n -r "$RATE" -c 1 -b 16 "$NOISE" synth "$NOISE_SECONDS" whitenoise vol "$NOISE_VOL"
NOISE_SAMPLES=$(soxi -s "$NOISE")

printf 'utt_id\tphrase\n' >"$STAGE/PHRASES.tsv"
SPK_ROWS=()

k=0
for row in "${SPEAKERS[@]}"; do
    IFS='|' read -r spk sex voice pitch speed chapters peak <<<"$row"
    read -r -a chs <<<"$chapters"
    nch=${#chs[@]}
    per_ch=$(((NPHRASES + nch - 1) / nch))
    spk_samples=0

    for ((p = 0; p < NPHRASES; p++)); do
        ci=$((p / per_ch))
        ch=${chs[$ci]}
        idx=$((p - ci * per_ch))
        utt=$(printf '%s-%s-%04d' "$spk" "$ch" "$idx")
        dir="$STAGE/$spk/$ch"
        mkdir -p "$dir"

        # Deterministic, speaker- and phrase-dependent leading/trailing silence.
        lead_ms=$((80 + 25 * k + 15 * ((p * 7 + k * 3) % 9)))
        trail_ms=$((120 + 20 * ((k * 5 + 2) % 7) + 10 * ((p * 5 + k) % 11)))

        espeak-ng -v "$voice" -p "$pitch" -s "$speed" -w "$WORK/raw.wav" "${PHRASES[$p]}"
        sox -R -D "$WORK/raw.wav" -r "$RATE" -c 1 -b 16 "$WORK/speech.wav" \
            gain -6 rate -v "$RATE" sinc -"$LOWPASS_HZ" gain -n "$peak" pad "$(ms_to_s "$lead_ms")" "$(ms_to_s "$trail_ms")"

        n=$(soxi -s "$WORK/speech.wav")
        span=$((NOISE_SAMPLES - n))
        if ((span <= 0)); then
            echo "make_demo.sh: utterance $utt longer than noise bed" >&2
            exit 1
        fi
        off=$((((k * NPHRASES + p) * 104729) % span))
        sox -R -D -m -v 1 "$WORK/speech.wav" \
            -v 1 "|sox -R -D '$NOISE' -p trim ${off}s ${n}s" \
            -r "$RATE" -c 1 -b 16 "$WORK/mix.wav"

        flac --silent --best --no-padding --no-seektable -f -o "$dir/$utt.flac" "$WORK/mix.wav"

        printf '%s %s\n' "$utt" "$(transcript "${PHRASES[$p]}")" >>"$dir/$spk-$ch.trans.txt"
        printf '%s\t%d\n' "$utt" "$p" >>"$STAGE/PHRASES.tsv"
        spk_samples=$((spk_samples + n))
    done

    # Minutes with two decimals, computed in integer arithmetic (deterministic).
    cmin=$(((spk_samples * 100 + RATE * 30) / (RATE * 60)))
    SPK_ROWS+=("$(printf '%-5s| %s | %-6s| %2d.%02d | espeak-ng %s -p %s -s %s' \
        "$spk" "$sex" "demo" $((cmin / 100)) $((cmin % 100)) "$voice" "$pitch" "$speed")")
    k=$((k + 1))
done

{
    echo "; Speakers of the ehmam demo corpus (synthetic, espeak-ng $(espeak-ng --version | awk '{print $4}'))."
    echo "; Format follows LibriSpeech SPEAKERS.TXT; NAME is the espeak-ng voice and settings."
    echo ";ID  |SEX| SUBSET |MINUTES| NAME"
    for r in "${SPK_ROWS[@]}"; do echo "$r"; done
} >"$STAGE/SPEAKERS.txt"

rm -rf "$OUT_DIR"
mv "$STAGE" "$OUT_DIR"

nutt=$(($(wc -l <"$OUT_DIR/PHRASES.tsv") - 1))
echo "make_demo.sh: wrote $nutt utterances from ${#SPEAKERS[@]} speakers to $OUT_DIR"
