package tests

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/tink"

	"github.com/cairnkms/cairn/internal/loadgen"
	"github.com/cairnkms/cairn/kmsclient"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/tests/framework"
)

// The out-of-process data-plane benchmark (`make bench-e2e`).
const (
	// e2ePairs is how many ABBA pairs of (Cairn, floor) runs each cell
	// makes: the two sides alternate, so drift hits both alike.
	e2ePairs = 3
	// e2eBatch is the items of one DecryptBatch call.
	e2eBatch = 100
	// e2eObject is the object size of the envelope cell.
	e2eObject = 1024
	// e2eDeadline bounds one cell's calls.
	e2eDeadline = 3 * time.Minute
	// e2eEcho is the floor's identity: a us-east KMS name, so the callers'
	// check of the server is the one they make of Cairn.
	e2eEcho = "kms/us-east/echo"
)

// e2ePprof, when set, gives the KMS under test (of BenchmarkDataPlaneE2E
// and BenchmarkTransitDecrypt) an ops listener on this
// address with /debug/pprof/ (--metrics-listen ADDR --pprof), to profile it
// under the benchmark's load: go tool pprof http://ADDR/debug/pprof/profile.
var e2ePprof = flag.String("e2e.pprof", "", "serve the benchmarked KMS's /debug/pprof/ on this address")

// e2eKMSArgs are more flags for the KMS under test, space-separated (for
// example -e2e.kms-args=--audit-sync to measure a durable audit log).
var e2eKMSArgs = flag.String("e2e.kms-args", "", "more flags for the benchmarked KMS, space-separated (e.g. --audit-sync)")

// e2eSide is what one side of a cell measured over all its runs.
type e2eSide struct {
	calls     int
	elapsed   time.Duration
	serverCPU time.Duration
	clientCPU time.Duration
	// clientAllocs are the heap allocations of this process (the load
	// generator: gRPC client, kmsclient, Tink) during the runs.
	clientAllocs uint64
	rss          int64
	lats         []time.Duration
}

func (s *e2eSide) rate() float64 { return float64(s.calls) / s.elapsed.Seconds() }

// quantile is the q-quantile (nearest rank) latency in µs.
func (s *e2eSide) quantile(q float64) float64 {
	if len(s.lats) == 0 {
		return 0
	}
	slices.Sort(s.lats)
	i := min(max(int(q*float64(len(s.lats))+0.999999)-1, 0), len(s.lats)-1)
	return float64(s.lats[i]) / float64(time.Microsecond)
}

func (s *e2eSide) cpuPerCall(cpu time.Duration) float64 {
	return float64(cpu) / float64(time.Microsecond) / float64(s.calls)
}

// e2eRow is one cell's final figures, for the summary.
type e2eRow struct {
	name        string
	items       int // per call (DEKs per DecryptBatch)
	cairn, echo e2eSide
}

// BenchmarkDataPlaneE2E measures the regional KMS as users run it: the
// shipped kms binary as its own process (audit log on disk, as
// startOneRegion starts it), against, in the same run, tests/echoserver: a
// bare gRPC server over the same mTLS with no interceptors and no work, the
// floor. This test process is the load generator: one mTLS connection to
// each server, exactly 1, 8 or 64 closed-loop callers, every answer
// checked. The cells: decrypt, encrypt and generate (a RAW AES256_GCM data
// key) of a 32-byte DEK with 16 bytes of associated data, decrypt-batch
// (100 DEKs a call), and envelope (a 1 KiB object through kmsclient's
// envelope AEAD, envelope-tink through Tink's own, both over kmsclient's
// AEAD of the keyset: one Encrypt and one Decrypt RPC per object, 16
// callers), whose floor is the echo's decrypt at the same concurrency.
// Two cells before the envelope take an object's cost apart at 16 callers:
// decrypt (the server's share, over the echo) and kmsclient-decrypt
// (kmsclient's AEAD over a bare stub, both against the KMS: the client
// library's share; its floor columns are Cairn's, not the echo's).
//
// In each cell Cairn and the floor run alternately, ABBA, e2ePairs times;
// only Cairn's runs are timed (ns/op is Cairn's). Each side reports
// ops/s, p50 and p99 latency, the server's CPU per call (utime + stime of
// the server process from /proc, all threads), the load generator's own
// CPU and heap allocations per call, and the server's RSS; then Cairn's figures over the
// floor's (x-floor-*: ops/s ratio, p99 ratio, CPU ratio). The summary
// table at the end repeats them, ratios last.
func BenchmarkDataPlaneE2E(b *testing.B) {
	kmsArgs := strings.Fields(*e2eKMSArgs)
	if *e2ePprof != "" {
		kmsArgs = append(kmsArgs, "--metrics-listen", *e2ePprof, "--pprof")
	}
	w, k := startOneRegion(b, oneRegion{team: transitTeam, kmsArgs: kmsArgs})
	w.Mint(e2eEcho)
	echo := w.EchoServer(e2eEcho)
	cairn, floor := k.Client(kmsClient), echo.Client(kmsClient)
	ctx, cancel := context.WithTimeout(b.Context(), e2eDeadline)
	defer cancel()

	type seal struct{ dek, ad, ct []byte }
	seals := make([]seal, 64)
	for i := range seals {
		s := seal{dek: randBytes(b, 32), ad: randBytes(b, 16)}
		r, err := cairn.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: kmsKeyset, Plaintext: s.dek, AssociatedData: s.ad})
		if err != nil {
			b.Fatalf("Encrypt = %v", err)
		}
		s.ct = r.GetCiphertext()
		seals[i] = s
	}
	// An echo call is checked for the shape of its answer; a Cairn call for
	// its content.
	type load func(c kmsv1.KMSClient, check bool) func(i int) loadgen.Call
	decrypt := func(c kmsv1.KMSClient, check bool) func(int) loadgen.Call {
		return func(i int) loadgen.Call {
			s := seals[i]
			req := &kmsv1.DecryptRequest{Keyset: kmsKeyset, Ciphertext: s.ct, AssociatedData: s.ad}
			return func(ctx context.Context) error {
				r, err := c.Decrypt(ctx, req)
				if err == nil && (len(r.GetPlaintext()) != len(s.dek) || check && !bytes.Equal(r.GetPlaintext(), s.dek)) {
					err = fmt.Errorf("Decrypt = %x, want %x", r.GetPlaintext(), s.dek)
				}
				return err
			}
		}
	}
	encrypt := func(c kmsv1.KMSClient, _ bool) func(int) loadgen.Call {
		return func(i int) loadgen.Call {
			s := seals[i]
			req := &kmsv1.EncryptRequest{Keyset: kmsKeyset, Plaintext: s.dek, AssociatedData: s.ad}
			return func(ctx context.Context) error {
				r, err := c.Encrypt(ctx, req)
				if err == nil && len(r.GetCiphertext()) != len(s.ct) {
					err = fmt.Errorf("Encrypt: a %d-byte ciphertext, want %d", len(r.GetCiphertext()), len(s.ct))
				}
				return err
			}
		}
	}
	generate := func(c kmsv1.KMSClient, _ bool) func(int) loadgen.Call {
		return func(i int) loadgen.Call {
			req := &kmsv1.GenerateDataKeyRequest{Keyset: kmsKeyset, Template: "AES256_GCM", Format: kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW, AssociatedData: seals[i].ad}
			return func(ctx context.Context) error {
				r, err := c.GenerateDataKey(ctx, req)
				if err == nil && (len(r.GetPlaintextKey()) != 32 || len(r.GetWrappedKey()) != len(seals[i].ct)) {
					err = fmt.Errorf("GenerateDataKey: a %d-byte key wrapped in %d bytes, want 32 in %d", len(r.GetPlaintextKey()), len(r.GetWrappedKey()), len(seals[i].ct))
				}
				return err
			}
		}
	}
	decryptBatch := func(c kmsv1.KMSClient, check bool) func(int) loadgen.Call {
		return func(i int) loadgen.Call {
			req := &kmsv1.DecryptBatchRequest{Keyset: kmsKeyset, Items: make([]*kmsv1.DecryptItem, e2eBatch)}
			for j := range req.Items {
				s := seals[(i+j)%len(seals)]
				req.Items[j] = &kmsv1.DecryptItem{Ciphertext: s.ct, AssociatedData: s.ad}
			}
			return func(ctx context.Context) error {
				r, err := c.DecryptBatch(ctx, req)
				if err != nil {
					return err
				}
				if len(r.GetResults()) != e2eBatch {
					return fmt.Errorf("DecryptBatch: %d results, want %d", len(r.GetResults()), e2eBatch)
				}
				for j, res := range r.GetResults() {
					s := seals[(i+j)%len(seals)]
					pt := res.GetOk().GetPlaintext()
					if len(pt) != len(s.dek) || check && !bytes.Equal(pt, s.dek) {
						return fmt.Errorf("DecryptBatch item %d = %v, want the DEK", j, res)
					}
				}
				return nil
			}
		}
	}

	var rows []*e2eRow
	// cell runs mine against Cairn's KMS and ref against refServer (the
	// echo, or for a cell that isolates the client the same KMS).
	cell := func(b *testing.B, name string, callers, items int, mine, ref func(int) loadgen.Call, refServer *framework.Process) {
		row := &e2eRow{name: name, items: items}
		mk := func(f func(int) loadgen.Call) []loadgen.Call {
			calls := make([]loadgen.Call, callers)
			for i := range calls {
				calls[i] = f(i)
			}
			return calls
		}
		sides := [2]struct {
			calls []loadgen.Call
			p     *framework.Process
			into  *e2eSide
		}{{mk(mine), k.Process, &row.cairn}, {mk(ref), refServer, &row.echo}}
		n := max(b.N/(2*e2ePairs), 1)
		ctx, cancel := context.WithTimeout(b.Context(), e2eDeadline)
		defer cancel()
		b.ResetTimer()
		b.StopTimer()
		for run := range 4 * e2ePairs {
			side := &sides[0]
			if run%4 == 1 || run%4 == 2 {
				side = &sides[1]
			}
			before, cb, mb := usage(b, side.p), selfCPU(b), mallocs()
			if side.into == &row.cairn {
				b.StartTimer()
			}
			r, err := loadgen.Run(ctx, n, side.calls, true)
			b.StopTimer()
			after, ca, ma := usage(b, side.p), selfCPU(b), mallocs()
			if err != nil {
				b.Fatal(err)
			}
			s := side.into
			s.calls += r.Calls
			s.elapsed += r.Elapsed
			s.serverCPU += after.CPU - before.CPU
			s.clientCPU += ca - cb
			s.clientAllocs += ma - mb
			s.rss = max(s.rss, after.RSS)
			s.lats = append(s.lats, r.Latencies()...)
		}
		c, e := &row.cairn, &row.echo
		b.ReportMetric(c.rate(), "ops/s")
		b.ReportMetric(c.quantile(0.50), "p50-µs")
		b.ReportMetric(c.quantile(0.99), "p99-µs")
		b.ReportMetric(c.cpuPerCall(c.serverCPU), "server-cpu-µs/op")
		b.ReportMetric(c.cpuPerCall(c.clientCPU), "client-cpu-µs/op")
		b.ReportMetric(float64(c.clientAllocs)/float64(c.calls), "client-allocs/op")
		b.ReportMetric(float64(c.rss)/(1<<20), "server-rss-MiB")
		if items > 1 {
			b.ReportMetric(c.rate()*float64(items), "items/s")
		}
		b.ReportMetric(e.rate(), "floor-ops/s")
		b.ReportMetric(e.quantile(0.99), "floor-p99-µs")
		b.ReportMetric(e.cpuPerCall(e.serverCPU), "floor-cpu-µs/op")
		b.ReportMetric(e.cpuPerCall(e.clientCPU), "floor-client-cpu-µs/op")
		b.ReportMetric(c.rate()/e.rate(), "x-floor-ops")
		b.ReportMetric(c.quantile(0.99)/e.quantile(0.99), "x-floor-p99")
		b.ReportMetric(c.cpuPerCall(c.serverCPU)/e.cpuPerCall(e.serverCPU), "x-floor-cpu")
		// The benchmark framework calls a cell again with a larger b.N: the
		// last call's row is the one reported.
		rows = slices.DeleteFunc(rows, func(r *e2eRow) bool { return r.name == row.name })
		rows = append(rows, row)
	}

	for _, op := range []struct {
		name  string
		l     load
		items int
	}{{"decrypt", decrypt, 1}, {"encrypt", encrypt, 1}, {"generate", generate, 1}, {"decrypt-batch", decryptBatch, e2eBatch}} {
		for _, callers := range []int{1, 8, 64} {
			name := fmt.Sprintf("%s/callers=%d", op.name, callers)
			b.Run(name, func(b *testing.B) {
				cell(b, name, callers, op.items, op.l(cairn, true), op.l(floor, false), echo.Process)
			})
		}
	}

	// Envelope: Tink's envelope AEAD over kmsclient, one Encrypt and one
	// Decrypt RPC per object.
	src := w.Source(kmsClient)
	kc, err := kmsclient.New(kmsclient.WithSource(src), kmsclient.WithEndpoints(kmsRegion, k.Addr))
	if err != nil {
		b.Fatalf("kmsclient.New = %v", err)
	}
	b.Cleanup(func() { kc.Close() })
	kek, err := kc.AEAD(kmsRegion, kmsKeyset)
	if err != nil {
		b.Fatalf("kmsclient AEAD = %v", err)
	}
	tinkEnv, err := aead.NewKMSEnvelopeAEADWithContext(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		b.Fatalf("NewKMSEnvelopeAEADWithContext = %v", err)
	}
	env, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		b.Fatalf("kmsclient.NewEnvelopeAEAD = %v", err)
	}
	// What an envelope object costs, taken apart at its concurrency: the
	// KMS's decrypt over the echo's (the server's share), then kmsclient's
	// decrypt over a bare stub's, both against the KMS (the client
	// library's share: its floor is Cairn, not the echo), then the objects.
	b.Run("decrypt/callers=16", func(b *testing.B) {
		cell(b, "decrypt/callers=16", 16, 1, decrypt(cairn, true), decrypt(floor, false), echo.Process)
	})
	b.Run("kmsclient-decrypt/callers=16", func(b *testing.B) {
		aeadDecrypt := func(i int) loadgen.Call {
			s := seals[i]
			return func(ctx context.Context) error {
				pt, err := kek.DecryptWithContext(ctx, s.ct, s.ad)
				if err == nil && !bytes.Equal(pt, s.dek) {
					err = fmt.Errorf("kmsclient Decrypt = %x, want %x", pt, s.dek)
				}
				return err
			}
		}
		cell(b, "kmsclient-decrypt/callers=16", 16, 1, aeadDecrypt, decrypt(cairn, true), k.Process)
	})
	for _, c := range []struct {
		name string
		env  tink.AEADWithContext
	}{{"envelope/callers=16", env}, {"envelope-tink/callers=16", tinkEnv}} {
		b.Run(c.name, func(b *testing.B) {
			cell(b, c.name, 16, 1, func(int) loadgen.Call { return envelopeRoundTrip(b, c.env, e2eObject) }, decrypt(floor, false), echo.Process)
		})
	}

	// The summary, ratios last.
	var t strings.Builder
	fmt.Fprintf(&t, "\nout of process, one mTLS connection per server, %d ABBA pairs per cell; server CPU from /proc, the load generator's (cliCPU) from getrusage (µs per call)\n", e2ePairs)
	fmt.Fprintf(&t, "%-24s %10s %8s %8s %8s %8s %8s %8s | %10s %8s %8s %8s | %7s %7s %7s\n", "cell", "ops/s", "p50µs", "p99µs", "cpuµs", "cliCPUµs", "rssMiB", "cliAlloc", "floor/s", "p99µs", "cpuµs", "cliCPUµs", "×ops", "×p99", "×cpu")
	for _, r := range rows {
		c, e := &r.cairn, &r.echo
		fmt.Fprintf(&t, "%-24s %10.0f %8.0f %8.0f %8.1f %8.1f %8.1f %8.0f | %10.0f %8.0f %8.1f %8.1f | %7.2f %7.2f %7.2f\n", r.name,
			c.rate(), c.quantile(0.5), c.quantile(0.99), c.cpuPerCall(c.serverCPU), c.cpuPerCall(c.clientCPU), float64(c.rss)/(1<<20), float64(c.clientAllocs)/float64(c.calls),
			e.rate(), e.quantile(0.99), e.cpuPerCall(e.serverCPU), e.cpuPerCall(e.clientCPU),
			c.rate()/e.rate(), c.quantile(0.99)/e.quantile(0.99), c.cpuPerCall(c.serverCPU)/e.cpuPerCall(e.serverCPU))
		if r.items > 1 {
			fmt.Fprintf(&t, "%-24s %10.0f items/s, %.2f µs of server CPU per item (floor %.0f items/s)\n", "", c.rate()*float64(r.items), c.cpuPerCall(c.serverCPU)/float64(r.items), e.rate()*float64(r.items))
		}
	}
	b.Log(t.String())
}

// usage reads a server process's CPU time and RSS.
func usage(b *testing.B, p *framework.Process) framework.Usage {
	b.Helper()
	u, err := p.Usage()
	if err != nil {
		b.Fatal(err)
	}
	return u
}

// mallocs is how many heap objects this process has allocated so far.
func mallocs() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.Mallocs
}

// selfCPU is this process's CPU time so far (user and system).
func selfCPU(b *testing.B) time.Duration {
	b.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// envelopeRoundTrip is one caller's envelope round trip of a random object
// of size bytes: encrypt with env (a new DEK, one KMS call), decrypt (one
// more), check the plaintext; each call uses the next associated data.
func envelopeRoundTrip(b testing.TB, env tink.AEADWithContext, size int) loadgen.Call {
	object, ad := randBytes(b, size), make([]byte, 8)
	var n uint64
	return func(ctx context.Context) error {
		n++
		binary.BigEndian.PutUint64(ad, n)
		ct, err := env.EncryptWithContext(ctx, object, ad)
		if err != nil {
			return err
		}
		pt, err := env.DecryptWithContext(ctx, ct, ad)
		if err == nil && !bytes.Equal(pt, object) {
			err = fmt.Errorf("envelope round trip %d gave %d other bytes", n, len(pt))
		}
		return err
	}
}
