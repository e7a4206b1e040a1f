#!/usr/bin/env bash
# The demo: a 30 s generated clip, packaged into private HLS, served, and played back through
# the key server by ffmpeg as an HLS client. Everything stays in ./hlsvault-data.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
export HLSVAULT_DATA_DIR="${HLSVAULT_DATA_DIR:-$PWD/hlsvault-data}"
unset REDIS_URL

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT="${HLSVAULT_DEMO_PORT:-8000}"
while ! port_free "$PORT"; do PORT=$((PORT + 1)); done
export HLSVAULT_PUBLIC_URL="http://127.0.0.1:$PORT"

mkdir -p "$HLSVAULT_DATA_DIR"
SAMPLE="$HLSVAULT_DATA_DIR/sample.mp4"
if [ ! -f "$SAMPLE" ]; then
  echo "demo: generating a 30 s 1280x720 sample clip with ffmpeg's lavfi sources"
  ffmpeg -nostdin -v error -y \
    -f lavfi -i "testsrc2=size=1280x720:rate=30" \
    -f lavfi -i "sine=frequency=440:sample_rate=48000" \
    -t 30 -c:v libx264 -preset veryfast -pix_fmt yuv420p -g 60 -c:a aac -b:a 128k \
    "$SAMPLE.tmp.mp4"
  mv "$SAMPLE.tmp.mp4" "$SAMPLE"
fi

echo "demo: packaging it with the default ladder (720p, 480p, 360p; AES-128)"
"$BIN/hlsvault" package "$SAMPLE" --asset demo

echo "demo: starting the key server on $HLSVAULT_PUBLIC_URL"
"$BIN/hlsvault" serve --port "$PORT" >"$HLSVAULT_DATA_DIR/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fsS "$HLSVAULT_PUBLIC_URL/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

URL="$("$BIN/hlsvault" url demo)"
echo "demo: playing it back through the key server with ffmpeg as the HLS client"
FRAMES=$(ffmpeg -nostdin -v error -i "$URL" -map 0:v:0 -f framemd5 - | grep -vc '^#')
EXPECTED=$(ffmpeg -nostdin -v error -i "$SAMPLE" -map 0:v:0 -f framemd5 - | grep -vc '^#')
if [ "$FRAMES" != "$EXPECTED" ]; then
  echo "demo: playback decoded $FRAMES frames, expected $EXPECTED" >&2
  exit 1
fi
NO_TOKEN=$(curl -s -o /dev/null -w '%{http_code}' "$HLSVAULT_PUBLIC_URL/v1/assets/demo/master.m3u8")
echo "demo: decoded all $FRAMES frames of the highest rendition through the key server;"
echo "      the same playlist without a token answers HTTP $NO_TOKEN"
echo
echo "Playback URL (token valid 4 h; open it in any HLS player while the server runs):"
echo "  $URL"
echo
echo "Serve it again:"
echo "  HLSVAULT_DATA_DIR=$HLSVAULT_DATA_DIR HLSVAULT_PUBLIC_URL=$HLSVAULT_PUBLIC_URL $BIN/hlsvault serve"
