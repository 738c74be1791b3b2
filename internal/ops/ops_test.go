package ops

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
)

func TestNewLogger(t *testing.T) {
	for _, tt := range []struct {
		format string
		want   string // a fragment of the line logged
		err    bool
	}{
		{"", `level=INFO msg=hello k=v`, false},
		{"text", `level=INFO msg=hello k=v`, false},
		{"json", `"msg":"hello","k":"v"`, false},
		{"yaml", "", true},
	} {
		var buf bytes.Buffer
		log, err := NewLogger(&buf, tt.format, false)
		if tt.err {
			if err == nil || !strings.Contains(err.Error(), "want text or json") {
				t.Errorf("NewLogger(%q) error = %v, want one naming the choices", tt.format, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("NewLogger(%q): %v", tt.format, err)
		}
		log.Debug("hidden")
		log.Info("hello", "k", "v")
		if got := buf.String(); !strings.Contains(got, tt.want) || strings.Contains(got, "hidden") {
			t.Errorf("NewLogger(%q) logged %q, want %q and no debug line", tt.format, got, tt.want)
		}
		if tt.format == "json" && !json.Valid(bytes.TrimSpace(buf.Bytes())) {
			t.Errorf("json log line %q is not JSON", buf.String())
		}
	}
}

func TestFlags(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	var f Flags
	f.Register(fs)
	if err := fs.Parse([]string{"--log-format", "json", "-v", "--metrics-listen", "127.0.0.1:0", "--reflection", "--pprof"}); err != nil {
		t.Fatal(err)
	}
	want := Flags{LogFormat: "json", Verbose: true, MetricsListen: "127.0.0.1:0", Reflection: true, Pprof: true}
	if f != want {
		t.Errorf("parsed flags = %+v, want %+v", f, want)
	}
	var buf bytes.Buffer
	log, err := f.Logger(&buf)
	if err != nil {
		t.Fatal(err)
	}
	log.Debug("dbg")
	if !strings.Contains(buf.String(), `"msg":"dbg"`) {
		t.Errorf("verbose json logger wrote %q, want the debug line", buf.String())
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestListener serves the ops routes for real on 127.0.0.1: the registry's
// Go, process and build-info series, liveness always, readiness following
// the server, pprof only when asked.
func TestListener(t *testing.T) {
	reg, err := NewRegistry("testbin")
	if err != nil {
		t.Fatal(err)
	}
	var ready atomic.Bool
	readiness := func() (bool, string) {
		if ready.Load() {
			return true, ""
		}
		return false, "sealed: no ceremony open"
	}
	for _, pprofOn := range []bool{false, true} {
		f := Flags{MetricsListen: "127.0.0.1:0", Pprof: pprofOn}
		l, err := f.Listen(slog.New(slog.DiscardHandler), reg, readiness)
		if err != nil {
			t.Fatal(err)
		}
		base := "http://" + l.Addr()
		code, body := get(t, base+"/metrics")
		for _, series := range []string{"go_goroutines ", "go_memstats_heap_inuse_bytes ", "process_resident_memory_bytes ", "process_cpu_seconds_total ", `cairn_build_info{binary="testbin"`} {
			if code != 200 || !strings.Contains(body, series) {
				t.Errorf("GET /metrics = %d, missing %q", code, series)
			}
		}
		if code, body := get(t, base+"/healthz"); code != 200 || body != "ok\n" {
			t.Errorf("GET /healthz = %d %q, want 200 ok", code, body)
		}
		ready.Store(false)
		if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "sealed: no ceremony open") {
			t.Errorf("GET /readyz (not ready) = %d %q, want 503 with the reason", code, body)
		}
		ready.Store(true)
		if code, _ := get(t, base+"/readyz"); code != 200 {
			t.Errorf("GET /readyz (ready) = %d, want 200", code)
		}
		wantPprof := 404
		if pprofOn {
			wantPprof = 200
		}
		if code, _ := get(t, base+"/debug/pprof/"); code != wantPprof {
			t.Errorf("GET /debug/pprof/ with pprof=%v = %d, want %d", pprofOn, code, wantPprof)
		}
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if c, err := net.Dial("tcp", l.Addr()); err == nil {
			c.Close()
			t.Errorf("the listener at %s still accepts after Close", l.Addr())
		}
	}
	var none Flags
	if l, err := none.Listen(slog.New(slog.DiscardHandler), reg, readiness); l != nil || err != nil || l.Close() != nil {
		t.Errorf("Listen with no address = %v, %v; want nothing", l, err)
	}
}
