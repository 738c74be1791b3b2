// Package ops is what every Cairn server shows operators besides its API:
// logs in text or JSON, a Prometheus registry of its own with the Go runtime
// and process collectors, and a plain-HTTP ops listener serving /metrics,
// /healthz (the process is alive), /readyz (it really serves: 503 and the
// reason when not) and, only when asked, /debug/pprof/.
//
// The ops listener is plain HTTP on purpose: Prometheus and kubelet probes
// scrape it without client certificates. It serves nothing secret: counts,
// states and reasons, never key material or request contents. Bind it to an
// address only the monitoring network reaches.
package ops

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Flags are the operator flags every Cairn server binary has.
type Flags struct {
	// LogFormat is "text" (logfmt-like, the default) or "json".
	LogFormat string
	// Verbose logs at debug level.
	Verbose bool
	// MetricsListen is the ops listener's address ("": none).
	MetricsListen string
	// Reflection serves gRPC reflection on the API listener.
	Reflection bool
	// Pprof serves /debug/pprof/ on the ops listener.
	Pprof bool
}

// Register adds the flags to fs.
func (f *Flags) Register(fs *flag.FlagSet) {
	fs.StringVar(&f.LogFormat, "log-format", "text", "log format: text or json")
	fs.BoolVar(&f.Verbose, "v", false, "debug logging")
	fs.StringVar(&f.MetricsListen, "metrics-listen", "", "address of the plain-HTTP ops listener: /metrics, /healthz, /readyz (empty: none)")
	fs.BoolVar(&f.Reflection, "reflection", false, "serve gRPC reflection on the API listener, for grpcurl (cairn up turns it on)")
	fs.BoolVar(&f.Pprof, "pprof", false, "serve /debug/pprof/ on the ops listener (profiling; off in production)")
}

// Logger returns the logger the flags ask for, writing to w.
func (f *Flags) Logger(w io.Writer) (*slog.Logger, error) {
	return NewLogger(w, f.LogFormat, f.Verbose)
}

// NewLogger returns a slog logger writing format ("text", "" or "json") to
// w, at debug level if verbose.
func NewLogger(w io.Writer, format string, verbose bool) (*slog.Logger, error) {
	opts := &slog.HandlerOptions{Level: slog.LevelInfo}
	if verbose {
		opts.Level = slog.LevelDebug
	}
	switch format {
	case "", "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("ops: --log-format %q: want text or json", format)
}

// NewRegistry returns a server's own Prometheus registry holding the Go
// runtime (go_*) and process (process_*) collectors and
// cairn_build_info{binary,version,goversion}.
func NewRegistry(binary string) (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	version, goVersion := "unknown", "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		version, goVersion = bi.Main.Version, bi.GoVersion
	}
	info := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "cairn", Name: "build_info",
		Help:        "Always 1; the labels say which binary and build this is.",
		ConstLabels: prometheus.Labels{"binary": binary, "version": version, "goversion": goVersion}})
	info.Set(1)
	for _, c := range []prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		info,
	} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("ops: registering collectors: %w", err)
		}
	}
	return reg, nil
}

// Readiness reports whether a server really serves (a distributor holds the
// root key, a root KMS replica has the root key and a leader, a KMS server
// serves a bundle) and, when not, why, in words an operator can act on. It is
// called on every health check and /readyz, so it must be cheap.
type Readiness func() (ready bool, reason string)

// Handler is the ops listener's routes: /metrics from reg, /healthz,
// /readyz from ready, and /debug/pprof/ if pprofOn.
func Handler(reg *prometheus.Registry, ready Readiness, pprofOn bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if ok, reason := ready(); !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, "not ready: "+reason+"\n")
			return
		}
		io.WriteString(w, "ready\n")
	})
	if pprofOn {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// Listener is a running ops listener. Close stops it.
type Listener struct {
	srv  *http.Server
	addr string
	done chan struct{}
}

// Listen starts the ops listener the flags ask for (nil, nil when
// MetricsListen is empty).
func (f *Flags) Listen(log *slog.Logger, reg *prometheus.Registry, ready Readiness) (*Listener, error) {
	if f.MetricsListen == "" {
		return nil, nil
	}
	lis, err := net.Listen("tcp", f.MetricsListen)
	if err != nil {
		return nil, fmt.Errorf("ops: listening on %s: %w", f.MetricsListen, err)
	}
	return Serve(log, lis, Handler(reg, ready, f.Pprof)), nil
}

// Serve serves h on lis until Close.
func Serve(log *slog.Logger, lis net.Listener, h http.Handler) *Listener {
	l := &Listener{
		// The profile endpoints stream for as long as asked (seconds=N),
		// so there is no write timeout; reads are bounded.
		srv:  &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10},
		addr: lis.Addr().String(),
		done: make(chan struct{}),
	}
	go func() {
		defer close(l.done)
		if err := l.srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("ops: listener stopped", "addr", l.addr, "err", err)
		}
	}()
	log.Info("ops: listening", "addr", l.addr, "paths", "/metrics /healthz /readyz")
	return l
}

// Addr is the address the listener serves on.
func (l *Listener) Addr() string {
	if l == nil {
		return ""
	}
	return l.addr
}

// Close stops the listener (waiting up to 5 s for scrapes in flight) and
// waits for its goroutine. Closing a nil Listener does nothing.
func (l *Listener) Close() error {
	if l == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := l.srv.Shutdown(ctx)
	if err != nil {
		err = l.srv.Close()
	}
	<-l.done
	return err
}
