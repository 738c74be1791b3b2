package kms_test

// Benchmarks of the regional KMS (`make bench`):
//
//   - BenchmarkDataPlane: Encrypt and Decrypt of a 32-byte DEK with 16 bytes
//     of associated data, and 100-item EncryptBatch/DecryptBatch, over one
//     mTLS connection on 127.0.0.1 with exactly 1, 16 or 64 concurrent
//     callers, against a real server (AES256_GCM keyset from a signed bundle,
//     audit log on a temp file). In the same run, with the same callers, the
//     same wire sizes and the same TLS credentials and identity interceptors,
//     a bare mTLS echo (no crypto, no audit) gives the RPC floor, and the same
//     echo behind the full Cairn stack (grpcserver: audit too) shows what the
//     audit record costs.
//   - BenchmarkReady: from a persisted bundle of 10k or 100k keysets on disk
//     to Ready() (verify, decrypt every keyset, build the AEADs, swap),
//     timed from the region keys' arrival and from kms.New (medians of at
//     least five boots), and the resident memory the loaded keysets take.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/grpcserver"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/loadgen"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

const (
	dekSize    = 32  // the payload: one AES-256 data key
	adSize     = 16  // its associated data
	batchItems = 100 // items per EncryptBatch/DecryptBatch call
	// benchDeadline bounds one sub-benchmark run, should a server wedge
	// (loadgen bounds each call within the servers' per-call cap).
	benchDeadline = 2 * time.Minute
)

// benchCallers are the concurrency levels of the data-plane benchmarks.
var benchCallers = []int{1, 16, 64}

// benchWorld is one region for benchmarks: a test PKI, region keys (in
// memory, as kmstest makes them) and a bundle signer.
type benchWorld struct {
	pki    *identitytest.PKI
	keys   *kmstest.RegionKeys
	signer *kmstest.Signer
}

func newBenchWorld(b *testing.B) *benchWorld {
	b.Helper()
	w := &benchWorld{pki: identitytest.New(b, identitytest.TrustDomain), keys: kmstest.NewRegionKeys(), signer: kmstest.NewSigner(b)}
	w.keys.AddVersion(b, region)
	return w
}

// persist signs a bundle (serial 1) holding kss and writes it to a new state
// directory exactly as ApplyBundle persists it (deterministic encoding of
// the SignedBundle, mode 0600), so a server started on the directory boots
// from it. It returns the directory.
func (w *benchWorld) persist(b *testing.B, kss ...*kmstest.Keyset) string {
	b.Helper()
	sb := w.signer.Sign(b, kmstest.Bundle(b, w.keys, region, 1, kss...))
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(sb)
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, kms.BundleFile), data, 0o600); err != nil {
		b.Fatal(err)
	}
	return dir
}

// config is a server configuration booting from dir.
func (w *benchWorld) config(b *testing.B, dir string, src *identity.Source, alog *audit.Log) kms.Config {
	return kms.Config{
		Region: region, StateDir: dir, Source: src, RegionKeys: w.keys,
		SigningKeys: []ed25519.PublicKey{w.signer.Public}, Audit: alog,
		Logger: slog.New(slog.NewTextHandler(b.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
		// The benchmarks measure the server at full load from one caller:
		// no quota, and no shedding below their concurrency.
		DefaultQuota: &kms.Quota{}, MaxInFlight: 1 << 16,
	}
}

// openAudit opens an audit log on a new temp file (page cache, no fsync:
// cmd/kms's default) and closes it at cleanup.
func openAudit(b *testing.B) *audit.Log {
	b.Helper()
	alog, err := audit.Open(filepath.Join(b.TempDir(), "audit.log"), audit.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { alog.Close() })
	return alog
}

func listen(b *testing.B) net.Listener {
	b.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	return lis
}

// startKMS starts a server on cfg and waits until it serves.
func startKMS(b *testing.B, cfg kms.Config) (*kms.Server, string) {
	b.Helper()
	srv, err := kms.New(cfg)
	if err != nil {
		b.Fatalf("kms.New = %v", err)
	}
	lis := listen(b)
	if err := srv.Start(lis); err != nil {
		b.Fatalf("Start = %v", err)
	}
	b.Cleanup(func() { srv.Close() })
	awaitReady(b, srv)
	return srv, lis.Addr().String()
}

// awaitReady polls s.Ready (every 100µs, so the poll adds at most that to a
// time-to-ready) for at most a minute.
func awaitReady(b *testing.B, s *kms.Server) {
	deadline := time.Now().Add(time.Minute)
	for !s.Ready() {
		if time.Now().After(deadline) {
			st, reason := s.State()
			b.Fatalf("server not ready after a minute: %v: %s", st, reason)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// dial connects to addr as id; the connection is closed at cleanup.
func (w *benchWorld) dial(b *testing.B, id, addr string) *grpc.ClientConn {
	b.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(w.pki.ClientCredentials(id)))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	return cc
}

// The echo: a DecryptRequest in, a DecryptResponse of the size Decrypt
// answers out, through a hand-written service so that nothing but the
// handler's work differs from KMS.Decrypt.
const (
	echoService = "cairn.bench.v1.Echo"
	echoMethod  = "/" + echoService + "/Echo"
)

// echoDesc registers the echo; the handler answers with resp.
func echoDesc(resp *kmsv1.DecryptResponse) *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: echoService,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Echo", Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
			in := new(kmsv1.DecryptRequest)
			if err := dec(in); err != nil {
				return nil, err
			}
			h := func(context.Context, any) (any, error) {
				// A fresh message per call, as a real handler returns.
				return &kmsv1.DecryptResponse{Plaintext: resp.GetPlaintext(), KeyId: resp.GetKeyId()}, nil
			}
			if interceptor == nil {
				return h(ctx, in)
			}
			return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: echoMethod}, h)
		}}},
	}
}

// startEcho serves the echo on loopback as a KMS identity of the region.
// With alog nil it is the bare mTLS RPC: the TLS credentials and the
// identity and policy interceptors the KMS uses. With alog, it is behind
// grpcserver.New like every Cairn server (those plus the audit interceptor,
// writing to alog).
func (w *benchWorld) startEcho(b *testing.B, resp *kmsv1.DecryptResponse, alog *audit.Log) string {
	b.Helper()
	src := w.pki.Source(kms2ID)
	policy := identity.Policy{echoMethod: identity.AllowAny()}
	var srv *grpc.Server
	if alog != nil {
		var err error
		srv, err = grpcserver.New(grpcserver.Options{Source: src, Policy: policy, Audit: alog, MaxRecvMsgSize: kms.DefaultMaxRecvMsgSize,
			Ready: func() (bool, string) { return true, "" }})
		if err != nil {
			b.Fatal(err)
		}
	} else {
		srv = grpc.NewServer(grpc.Creds(identity.ServerCredentials(src, identity.MemberOf(src.TrustDomain()))),
			grpc.ChainUnaryInterceptor(identity.UnaryServerInterceptor(), identity.UnaryAuthorizeInterceptor(policy)),
			grpc.MaxRecvMsgSize(kms.DefaultMaxRecvMsgSize))
	}
	srv.RegisterService(echoDesc(resp), struct{}{})
	lis := listen(b)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	b.Cleanup(func() { srv.Stop(); <-done })
	return lis.Addr().String()
}

// sealed is one DEK wrapped by the server.
type sealed struct{ dek, ad, ct []byte }

func randBytes(n int) []byte {
	p := make([]byte, n)
	_, _ = rand.Read(p)
	return p
}

// BenchmarkDataPlane measures the KMS data plane over mTLS on loopback, one
// connection shared by exactly N callers (as a storage node's client would),
// and the bare mTLS echo beside it. Per sub-benchmark: ops/s, and p50 and p99
// latency in µs over every call of the final run. Decrypt, encrypt and the
// audited echo also report their throughput as a multiple of the bare echo's
// at the same concurrency (decrypt/echo: the target is >= 0.8 at 64
// callers), measured paired: after the timed run, untimed, the two alternate
// in ABBA order for as many calls again each, so both see the same
// background load (a separate 1-second run of each is at the mercy of
// whatever else the machine does meanwhile).
func BenchmarkDataPlane(b *testing.B) {
	w := newBenchWorld(b)
	ks := kmstest.NewKeyset(b, ledger, kmstest.ACL("client/us-east/app"))
	cfg := w.config(b, w.persist(b, ks), w.pki.Source(kms1ID), openAudit(b))
	_, addr := startKMS(b, cfg)
	client := kmsv1.NewKMSClient(w.dial(b, appID, addr))

	ctx, cancel := context.WithTimeout(b.Context(), benchDeadline)
	defer cancel()
	// One sealed DEK per caller, wrapped by the server under test.
	seals := make([]sealed, slices.Max(benchCallers))
	for i := range seals {
		dek, ad := randBytes(dekSize), randBytes(adSize)
		r, err := client.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: dek, AssociatedData: ad})
		if err != nil {
			b.Fatalf("Encrypt = %v", err)
		}
		seals[i] = sealed{dek: dek, ad: ad, ct: r.GetCiphertext()}
	}
	// The echo answers what Decrypt answers, byte for byte in size.
	echoResp := &kmsv1.DecryptResponse{Plaintext: randBytes(dekSize), KeyId: ks.Primary()}
	echoConn := w.dial(b, appID, w.startEcho(b, echoResp, nil))
	auditedConn := w.dial(b, appID, w.startEcho(b, echoResp, openAudit(b)))
	callEcho := func(cc *grpc.ClientConn) load {
		return func(i int) func(context.Context) error {
			req := &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: seals[i].ct, AssociatedData: seals[i].ad}
			return func(ctx context.Context) error {
				return cc.Invoke(ctx, echoMethod, req, new(kmsv1.DecryptResponse))
			}
		}
	}
	echo, audited := callEcho(echoConn), callEcho(auditedConn)
	decrypt := func(i int) func(context.Context) error {
		s := seals[i]
		req := &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: s.ct, AssociatedData: s.ad}
		return func(ctx context.Context) error {
			r, err := client.Decrypt(ctx, req)
			if err != nil {
				return err
			}
			if !bytes.Equal(r.GetPlaintext(), s.dek) {
				return fmt.Errorf("Decrypt = %x, want %x", r.GetPlaintext(), s.dek)
			}
			return nil
		}
	}
	encrypt := func(i int) func(context.Context) error {
		s := seals[i]
		req := &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: s.dek, AssociatedData: s.ad}
		return func(ctx context.Context) error {
			r, err := client.Encrypt(ctx, req)
			if err != nil {
				return err
			}
			if len(r.GetCiphertext()) != len(s.ct) {
				return fmt.Errorf("Encrypt: %d-byte ciphertext, want %d", len(r.GetCiphertext()), len(s.ct))
			}
			return nil
		}
	}

	for _, callers := range benchCallers {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			b.Run("echo", func(b *testing.B) { runCallers(b, callers, 1, echo) })
			for _, c := range []struct {
				name, ratio string
				l           load
			}{
				{"decrypt", "decrypt/echo", decrypt},
				{"encrypt", "encrypt/echo", encrypt},
				{"echo-audited", "audited/echo", audited},
			} {
				b.Run(c.name, func(b *testing.B) {
					runCallers(b, callers, 1, c.l)
					reportPaired(b, callers, c.ratio, c.l, echo)
				})
			}
		})
	}

	// Batches of 100 DEKs (distinct DEKs and associated data per item).
	encItems := make([]*kmsv1.EncryptItem, batchItems)
	for i := range encItems {
		encItems[i] = &kmsv1.EncryptItem{Plaintext: randBytes(dekSize), AssociatedData: randBytes(adSize)}
	}
	er, err := client.EncryptBatch(ctx, &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: encItems})
	if err != nil {
		b.Fatalf("EncryptBatch = %v", err)
	}
	decItems := make([]*kmsv1.DecryptItem, batchItems)
	for i, r := range er.GetResults() {
		if r.GetOk() == nil {
			b.Fatalf("EncryptBatch item %d: %v", i, r.GetError())
		}
		decItems[i] = &kmsv1.DecryptItem{Ciphertext: r.GetOk().GetCiphertext(), AssociatedData: encItems[i].GetAssociatedData()}
	}
	checkBatch := func(n int, errAt func(int) *kmsv1.ItemError) error {
		if n != batchItems {
			return fmt.Errorf("%d results, want %d", n, batchItems)
		}
		for i := range n {
			if e := errAt(i); e != nil {
				return fmt.Errorf("item %d: %v", i, e)
			}
		}
		return nil
	}
	encryptBatch := func(int) func(context.Context) error {
		req := &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: encItems}
		return func(ctx context.Context) error {
			r, err := client.EncryptBatch(ctx, req)
			if err != nil {
				return err
			}
			return checkBatch(len(r.GetResults()), func(i int) *kmsv1.ItemError { return r.GetResults()[i].GetError() })
		}
	}
	decryptBatch := func(int) func(context.Context) error {
		req := &kmsv1.DecryptBatchRequest{Keyset: ledger, Items: decItems}
		return func(ctx context.Context) error {
			r, err := client.DecryptBatch(ctx, req)
			if err != nil {
				return err
			}
			if err := checkBatch(len(r.GetResults()), func(i int) *kmsv1.ItemError { return r.GetResults()[i].GetError() }); err != nil {
				return err
			}
			last := r.GetResults()[batchItems-1].GetOk().GetPlaintext()
			if want := encItems[batchItems-1].GetPlaintext(); !bytes.Equal(last, want) {
				return fmt.Errorf("last item decrypts to %x, want %x", last, want)
			}
			return nil
		}
	}
	for _, callers := range []int{1, 16} {
		b.Run(fmt.Sprintf("batch=%d/callers=%d", batchItems, callers), func(b *testing.B) {
			b.Run("encrypt", func(b *testing.B) { runCallers(b, callers, batchItems, encryptBatch) })
			b.Run("decrypt", func(b *testing.B) { runCallers(b, callers, batchItems, decryptBatch) })
		})
	}
}

// load is a kind of call: newCall(i) returns caller i's call, with requests
// of its own (no two callers share a message).
type load func(i int) func(context.Context) error

// callers returns the calls of exactly n callers of l.
func (l load) callers(n int) []loadgen.Call {
	calls := make([]loadgen.Call, n)
	for i := range calls {
		calls[i] = l(i)
	}
	return calls
}

// runCallers makes b.N calls of l, timed, shared by exactly callers
// goroutines, and reports the throughput and the p50 and p99 latency of a
// call; a call of perCall > 1 items also reports items as DEKs/s.
func runCallers(b *testing.B, callers, perCall int, l load) {
	ctx, cancel := context.WithTimeout(b.Context(), benchDeadline)
	defer cancel()
	calls := l.callers(callers)
	b.ResetTimer()
	r, err := loadgen.Run(ctx, b.N, calls, true)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	r.Report(b, "ops/s")
	if perCall > 1 {
		b.ReportMetric(r.Rate()*float64(perCall), "DEKs/s")
	}
}

// pairs is how many (l, ref) pairs reportPaired runs, in ABBA order.
const pairs = 10

// reportPaired reports, under unit, the throughput of l over that of ref at
// the same concurrency, untimed (after the timer stopped): pairs runs of
// each, of b.N/pairs calls (at least 64), back to back in ABBA order so that
// background load and drift fall on both alike.
func reportPaired(b *testing.B, callers int, unit string, l, ref load) {
	ctx, cancel := context.WithTimeout(b.Context(), benchDeadline)
	defer cancel()
	n := max(b.N/pairs, 64)
	a, r := l.callers(callers), ref.callers(callers)
	var ta, tr time.Duration
	for p := range 2 * pairs {
		calls, total := a, &ta
		if p%4 == 0 || p%4 == 3 { // ref, l, l, ref, ...
			calls, total = r, &tr
		}
		res, err := loadgen.Run(ctx, n, calls, false)
		if err != nil {
			b.Fatal(err)
		}
		*total += res.Elapsed
	}
	b.ReportMetric(tr.Seconds()/ta.Seconds(), unit)
}

// BenchmarkReady measures a boot from a persisted bundle of 10k and 100k
// AES256_GCM keysets. Each boot runs kms.New and Start on the state
// directory (the signed bundle on disk, and a usage history in which every
// keyset was used): Start reads and verifies the bundle and reads the
// history, then the boot loop fetches the region keys (from an in-memory
// RegionKeys), decrypts every keyset, builds its AEAD and ACLs, restores the
// history and swaps the store in. It reports, as the median over the run's
// boots (at least minBoots of them, so one run gives the median of five):
//
//   - ms-to-ready: from the moment the region keys arrive (RegionKeys.Fetch
//     returns) to Ready(): the part of a boot that waits on nothing but this
//     server's CPUs (target for 100k: under 1000);
//   - ms-boot: from kms.New to Ready();
//
// and what the serving server holds per keyset, divided by the number of
// keysets, once the history is flushed after the swap (the flush's garbage
// is not resident memory): RSS-bytes/keyset, the growth of the process's
// VmRSS from before kms.New (target: at most 2048), and heap-bytes/keyset,
// that of the live Go heap, both read after a GC that returns free memory to
// the OS (the retained signed bundle included). B/op and allocs/op are those
// of one boot.
func BenchmarkReady(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprintf("keysets=%d", n), func(b *testing.B) { benchReady(b, n) })
	}
}

// minBoots is the fewest boots a BenchmarkReady run measures: the reported
// times are medians over them.
const minBoots = 5

// arrivalKeys is a RegionKeys that records when the keys arrived: the
// moment its last Fetch returned them.
type arrivalKeys struct {
	kms.RegionKeys
	at atomic.Pointer[time.Time]
}

func (a *arrivalKeys) Fetch(ctx context.Context, region string) (map[uint32]tink.AEAD, error) {
	keys, err := a.RegionKeys.Fetch(ctx, region)
	if err == nil {
		now := time.Now()
		a.at.Store(&now)
	}
	return keys, err
}

func benchReady(b *testing.B, n int) {
	w := newBenchWorld(b)
	dir := w.persistMany(b, n)
	keys := &arrivalKeys{RegionKeys: w.keys}
	cfg := w.config(b, dir, w.pki.Source(kms1ID), openAudit(b))
	cfg.RegionKeys = keys
	// The server's default cap on calls in progress, not the data-plane
	// benchmarks' 1<<16: the server keeps a stream worker (a goroutine and
	// its stack) per call it admits at once, a fixed cost of the
	// configuration that has nothing to do with the keysets.
	cfg.MaxInFlight = 0
	var (
		ready, boot []time.Duration
		rss, heap   []float64 // growth per keyset
	)
	// bootOnce boots once; timed, with the benchmark's timer running from
	// kms.New to Ready().
	bootOnce := func(timed bool) {
		b.StopTimer()
		keys.at.Store(nil)
		history := statUsageFile(b, dir)
		before := sampleMemory(b)
		lis := listen(b)
		if timed {
			b.StartTimer()
		}

		start := time.Now()
		srv, err := kms.New(cfg)
		if err != nil {
			lis.Close()
			b.Fatalf("kms.New = %v", err)
		}
		b.Cleanup(func() { srv.Close() }) // if the boot fails; Close is idempotent
		if err := srv.Start(lis); err != nil {
			b.Fatalf("Start = %v", err)
		}
		awaitReady(b, srv)
		end := time.Now()

		b.StopTimer()
		arrived := keys.at.Load()
		if arrived == nil {
			b.Fatal("ready without a region key fetch")
		}
		ready = append(ready, end.Sub(*arrived))
		boot = append(boot, end.Sub(start))
		if st, _ := srv.State(); st != kmsv1.ServingState_SERVING_STATE_SERVING {
			b.Fatalf("State = %v, want SERVING", st)
		}
		awaitFlushed(b, dir, history)
		loaded := sampleMemory(b)
		srv.Close()
		rss = append(rss, (float64(loaded.rss)-float64(before.rss))/float64(n))
		heap = append(heap, (float64(loaded.heap)-float64(before.heap))/float64(n))
		if timed {
			b.StartTimer()
		}
	}
	for b.Loop() {
		bootOnce(true)
	}
	// Too few boots for a median (a long boot fits the benchtime once or
	// twice): more, outside the timed loop.
	for len(ready) < minBoots {
		bootOnce(false)
	}
	b.ReportMetric(median(ready).Seconds()*1e3, "ms-to-ready")
	b.ReportMetric(median(boot).Seconds()*1e3, "ms-boot")
	b.ReportMetric(median(rss), "RSS-bytes/keyset")
	b.ReportMetric(median(heap), "heap-bytes/keyset")
}

// median returns the median of xs (the mean of the middle two if even).
func median[T time.Duration | float64](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// statUsageFile returns the usage history file of dir as it is now.
func statUsageFile(b *testing.B, dir string) os.FileInfo {
	b.Helper()
	fi, err := os.Stat(filepath.Join(dir, kms.UsageFile))
	if err != nil {
		b.Fatal(err)
	}
	return fi
}

// awaitFlushed waits (at most a minute) until the server has written its
// usage history after the swap: a new file replaced before (the history is
// written to a temp file renamed over the old one).
func awaitFlushed(b *testing.B, dir string, before os.FileInfo) {
	b.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		fi, err := os.Stat(filepath.Join(dir, kms.UsageFile))
		if err == nil && !os.SameFile(fi, before) {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("no usage history written a minute after the swap (last stat error: %v)", err)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// persistMany persists a bundle of n AES256_GCM keysets (one key each;
// names like t042/keyset-042123, 1000 per team) that the client app may use,
// and keeps none of their material in memory.
func (w *benchWorld) persistMany(b *testing.B, n int) string {
	b.Helper()
	acl := kmstest.ACL("client/us-east/app")
	kss := make([]*kmstest.Keyset, n)
	for i := range kss {
		kss[i] = kmstest.NewKeyset(b, fmt.Sprintf("t%03d/keyset-%06d", i/1000, i), acl)
	}
	dir := w.persist(b, kss...)
	// A history in which every keyset's primary was used a minute ago, as
	// a busy server leaves behind.
	var history bytes.Buffer
	history.WriteString("cairn-kms-usage 1\n")
	used := time.Now().Add(-time.Minute).UnixNano()
	for _, k := range kss {
		fmt.Fprintf(&history, "%s\t%d\t1\t%d\t10\t20\t%d\n", k.Name, k.Primary(), int64(kmstest.DefaultTTL), used)
	}
	if err := os.WriteFile(filepath.Join(dir, kms.UsageFile), history.Bytes(), 0o600); err != nil {
		b.Fatal(err)
	}
	return dir
}

// memSample is the process's resident set and live heap, in bytes.
type memSample struct{ rss, heap uint64 }

// sampleMemory collects garbage, returns free memory to the OS, and reads
// VmRSS from /proc/self/status and the live heap.
func sampleMemory(b *testing.B) memSample {
	b.Helper()
	debug.FreeOSMemory() // a GC, then every free page back to the OS
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memSample{rss: vmRSS(b), heap: ms.HeapAlloc}
}

func vmRSS(b *testing.B) uint64 {
	b.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		b.Skipf("no /proc/self/status: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				b.Fatalf("VmRSS %q: %v", v, err)
			}
			return kb << 10
		}
	}
	b.Fatal("no VmRSS in /proc/self/status")
	return 0
}
