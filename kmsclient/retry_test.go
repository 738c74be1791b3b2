package kmsclient_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kmsclient"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// fakeKMS is a real gRPC KMS server on loopback, over mTLS with the identity
// it is given, whose answers the test scripts and counts.
type fakeKMS struct {
	kmsv1.UnimplementedKMSServer
	addr   string
	calls  atomic.Int64
	answer atomic.Pointer[func(context.Context) error]
}

// answerCode answers with code (OK: success).
func answerCode(code codes.Code) func(context.Context) error {
	return func(context.Context) error {
		if code == codes.OK {
			return nil
		}
		return status.Error(code, "fake: "+code.String())
	}
}

// answerHang never answers: it waits until the call ends.
func answerHang(ctx context.Context) error {
	<-ctx.Done()
	return status.FromContextError(ctx.Err()).Err()
}

func startFake(t *testing.T, pki *identitytest.PKI, id string, answer func(context.Context) error) *fakeKMS {
	t.Helper()
	f := &fakeKMS{}
	f.set(answer)
	srv := grpc.NewServer(grpc.Creds(pki.ServerCredentials(id)))
	kmsv1.RegisterKMSServer(srv, f)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = lis.Addr().String()
	var wg sync.WaitGroup
	wg.Go(func() { srv.Serve(lis) })
	t.Cleanup(func() { srv.Stop(); wg.Wait() })
	return f
}

func (f *fakeKMS) set(answer func(context.Context) error) { f.answer.Store(&answer) }

func (f *fakeKMS) Encrypt(ctx context.Context, req *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error) {
	f.calls.Add(1)
	if err := (*f.answer.Load())(ctx); err != nil {
		return nil, err
	}
	return &kmsv1.EncryptResponse{Ciphertext: []byte("fake ciphertext"), KeyId: 1}, nil
}

func (f *fakeKMS) Decrypt(ctx context.Context, req *kmsv1.DecryptRequest) (*kmsv1.DecryptResponse, error) {
	f.calls.Add(1)
	if err := (*f.answer.Load())(ctx); err != nil {
		return nil, err
	}
	return &kmsv1.DecryptResponse{Plaintext: []byte("fake plaintext"), KeyId: 1}, nil
}

// sleepRecorder records the client's backoff pauses (and sleeps them).
type sleepRecorder struct {
	mu sync.Mutex
	ds []time.Duration
}

func (s *sleepRecorder) option() kmsclient.Option {
	return kmsclient.WithSleep(func(ctx context.Context, d time.Duration) error {
		s.mu.Lock()
		s.ds = append(s.ds, d)
		s.mu.Unlock()
		return kmsclient.SleepContext(ctx, d)
	})
}

func (s *sleepRecorder) pauses() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Duration(nil), s.ds...)
}

// fakeClient returns a client of the app identity with opts.
func fakeClient(t *testing.T, pki *identitytest.PKI, opts ...kmsclient.Option) *kmsclient.Client {
	t.Helper()
	// Listed order: the tests below name which endpoint is tried first.
	c, err := kmsclient.New(append([]kmsclient.Option{kmsclient.WithSource(pki.Source(appID)), kmsclient.WithListedOrder()}, opts...)...)
	if err != nil {
		t.Fatalf("New = %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

const fakeEast1, fakeEast2, fakeEast3 = "spiffe://cairn.test/kms/us-east/fake-1", "spiffe://cairn.test/kms/us-east/fake-2", "spiffe://cairn.test/kms/us-east/fake-3"

// TestRetryCodes: the retryable codes are retried up to MaxAttempts, with a
// backoff below its ceiling between rounds; every other code is returned
// after one attempt, and every error carries its code.
func TestRetryCodes(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	policy := kmsclient.RetryPolicy{MaxAttempts: 3, InitialBackoff: 4 * time.Millisecond, MaxBackoff: 6 * time.Millisecond}
	tests := []struct {
		code      codes.Code
		retryable bool
	}{
		{codes.Unavailable, true},
		{codes.ResourceExhausted, true},
		{codes.DeadlineExceeded, true},
		{codes.InvalidArgument, false},
		{codes.NotFound, false},
		{codes.PermissionDenied, false},
		{codes.FailedPrecondition, false},
		{codes.Unauthenticated, false},
		{codes.Internal, false},
		{codes.Unknown, false},
		{codes.Aborted, false},
		{codes.Canceled, false},
	}
	for _, tc := range tests {
		t.Run(tc.code.String(), func(t *testing.T) {
			f := startFake(t, pki, fakeEast1, answerCode(tc.code))
			sleeps := &sleepRecorder{}
			c := fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr), kmsclient.WithRetry(policy), sleeps.option())
			a := aeadOf(t, c, east, ledger)
			for name, call := range map[string]func() ([]byte, error){
				"Encrypt": func() ([]byte, error) { return a.Encrypt([]byte("pt"), nil) },
				"Decrypt": func() ([]byte, error) { return a.Decrypt([]byte("ct"), nil) },
			} {
				f.calls.Store(0)
				before := len(sleeps.pauses())
				got, err := call()
				if err == nil || got != nil {
					t.Fatalf("%s = %q, %v, want nil and an error", name, got, err)
				}
				if code := status.Code(err); code != tc.code {
					t.Errorf("%s: status.Code(%v) = %v, want %v", name, err, code, tc.code)
				}
				if !strings.HasPrefix(err.Error(), "kmsclient: "+strings.ToLower(name)+` with keyset "payments/ledger" in region us-east`) {
					t.Errorf("%s: error %q does not start with the operation, keyset and region", name, err)
				}
				wantCalls, wantSleeps := int64(1), 0
				if tc.retryable {
					wantCalls, wantSleeps = int64(policy.MaxAttempts), policy.MaxAttempts-1
				}
				if got := f.calls.Load(); got != wantCalls {
					t.Errorf("%s: the server got %d calls, want %d", name, got, wantCalls)
				}
				pauses := sleeps.pauses()[before:]
				if len(pauses) != wantSleeps {
					t.Errorf("%s: %d backoff pauses %v, want %d", name, len(pauses), pauses, wantSleeps)
				}
				for round, d := range pauses {
					if ceil := kmsclient.BackoffCeiling(policy, round); d < 0 || d >= ceil {
						t.Errorf("%s: pause %d = %v, want in [0, %v)", name, round, d, ceil)
					}
				}
			}
		})
	}
}

// TestFailoverWithoutBackoff: failing over to another endpoint does not
// pause; the endpoint that answered stays in use; a failure there moves on
// (wrapping around) to the next.
func TestFailoverWithoutBackoff(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	fa := startFake(t, pki, fakeEast1, answerCode(codes.Unavailable))
	fb := startFake(t, pki, fakeEast2, answerCode(codes.ResourceExhausted))
	fc := startFake(t, pki, fakeEast3, answerCode(codes.OK))
	sleeps := &sleepRecorder{}
	c := fakeClient(t, pki, kmsclient.WithEndpoints(east, fa.addr, fb.addr, fc.addr), sleeps.option())
	a := aeadOf(t, c, east, ledger)

	calls := func() [3]int64 { return [3]int64{fa.calls.Load(), fb.calls.Load(), fc.calls.Load()} }
	if _, err := a.Encrypt([]byte("pt"), nil); err != nil {
		t.Fatalf("Encrypt = %v", err)
	}
	if got, want := calls(), [3]int64{1, 1, 1}; got != want {
		t.Errorf("calls per endpoint = %v, want %v", got, want)
	}
	if _, err := a.Decrypt([]byte("ct"), nil); err != nil {
		t.Fatalf("Decrypt = %v", err)
	}
	if got, want := calls(), [3]int64{1, 1, 2}; got != want {
		t.Errorf("after a second call, calls per endpoint = %v, want %v (sticky)", got, want)
	}
	fa.set(answerCode(codes.OK))
	fc.set(answerCode(codes.Unavailable))
	if _, err := a.Encrypt([]byte("pt"), nil); err != nil {
		t.Fatalf("Encrypt = %v", err)
	}
	if got, want := calls(), [3]int64{2, 1, 3}; got != want {
		t.Errorf("after the third endpoint failed, calls per endpoint = %v, want %v (wrapped around)", got, want)
	}
	if p := sleeps.pauses(); len(p) != 0 {
		t.Errorf("backoff pauses %v, want none", p)
	}
}

// TestBackoffRounds: with every endpoint failing, the client pauses only
// between rounds, and its error names the attempts, the endpoints tried and
// the last cause.
func TestBackoffRounds(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	fa := startFake(t, pki, fakeEast1, answerCode(codes.Unavailable))
	fb := startFake(t, pki, fakeEast2, answerCode(codes.Unavailable))
	sleeps := &sleepRecorder{}
	policy := kmsclient.RetryPolicy{MaxAttempts: 5, InitialBackoff: 8 * time.Millisecond, MaxBackoff: 12 * time.Millisecond}
	c := fakeClient(t, pki, kmsclient.WithEndpoints(east, fa.addr, fb.addr), kmsclient.WithRetry(policy), sleeps.option())
	_, err := aeadOf(t, c, east, ledger).Encrypt([]byte("pt"), nil)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("Encrypt = %v, want Unavailable", err)
	}
	if a, b := fa.calls.Load(), fb.calls.Load(); a != 3 || b != 2 {
		t.Errorf("calls = %d, %d, want 3, 2", a, b)
	}
	pauses := sleeps.pauses()
	if len(pauses) != 2 {
		t.Fatalf("pauses %v, want 2 (after rounds 1 and 2 of 3)", pauses)
	}
	for round, d := range pauses {
		if ceil := kmsclient.BackoffCeiling(policy, round); d >= ceil {
			t.Errorf("pause %d = %v, want < %v", round, d, ceil)
		}
	}
	for _, want := range []string{"5 attempts on 2 of 2 endpoints", "last error from " + fa.addr, "fake: Unavailable"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

// TestBackoffCeiling: the ceiling doubles from InitialBackoff and stops at
// MaxBackoff; full jitter draws from [0, ceiling).
func TestBackoffCeiling(t *testing.T) {
	p := kmsclient.RetryPolicy{MaxAttempts: 5, InitialBackoff: 50 * time.Millisecond, MaxBackoff: time.Second}
	want := []time.Duration{50, 100, 200, 400, 800, 1000, 1000, 1000}
	for round, w := range want {
		if got := kmsclient.BackoffCeiling(p, round); got != w*time.Millisecond {
			t.Errorf("BackoffCeiling(round %d) = %v, want %v", round, got, w*time.Millisecond)
		}
	}
	if got := kmsclient.BackoffCeiling(p, 1000); got != time.Second {
		t.Errorf("BackoffCeiling(round 1000) = %v, want 1s (no overflow)", got)
	}
	const ceil, n = 100 * time.Millisecond, 2000
	var sum time.Duration
	distinct := map[time.Duration]bool{}
	for range n {
		d := kmsclient.FullJitter(ceil)
		if d < 0 || d >= ceil {
			t.Fatalf("FullJitter(%v) = %v, want in [0, %v)", ceil, d, ceil)
		}
		sum += d
		distinct[d] = true
	}
	if mean := sum / n; mean < 35*time.Millisecond || mean > 65*time.Millisecond {
		t.Errorf("mean of %d FullJitter(%v) = %v, want about %v", n, ceil, mean, ceil/2)
	}
	if len(distinct) < n/2 {
		t.Errorf("%d distinct values of %d draws: not random", len(distinct), n)
	}
	if got := kmsclient.FullJitter(0); got != 0 {
		t.Errorf("FullJitter(0) = %v, want 0", got)
	}
}

// TestAttemptTimeout: a hung attempt ends at the attempt timeout and is
// retried; the caller's own deadline or cancellation is not retried, also
// not during a backoff.
func TestAttemptTimeout(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	f := startFake(t, pki, fakeEast1, answerHang)

	t.Run("attempt deadline retried", func(t *testing.T) {
		f.calls.Store(0)
		c := fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr), kmsclient.WithAttemptTimeout(50*time.Millisecond),
			kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 3, InitialBackoff: time.Millisecond, MaxBackoff: time.Millisecond}))
		_, err := aeadOf(t, c, east, ledger).Encrypt([]byte("pt"), nil)
		if status.Code(err) != codes.DeadlineExceeded {
			t.Errorf("Encrypt = %v, want DeadlineExceeded", err)
		}
		if got := f.calls.Load(); got != 3 {
			t.Errorf("the server got %d calls, want 3", got)
		}
	})

	t.Run("caller deadline not retried", func(t *testing.T) {
		f.calls.Store(0)
		c := fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr), kmsclient.WithAttemptTimeout(10*time.Second))
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		_, err := aeadOf(t, c, east, ledger).EncryptWithContext(ctx, []byte("pt"), nil)
		if status.Code(err) != codes.DeadlineExceeded || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Encrypt = %v, want DeadlineExceeded wrapping context.DeadlineExceeded", err)
		}
		if got := f.calls.Load(); got != 1 {
			t.Errorf("the server got %d calls, want 1", got)
		}
	})

	t.Run("client timeout", func(t *testing.T) {
		f.calls.Store(0)
		c := fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr), kmsclient.WithTimeout(100*time.Millisecond), kmsclient.WithAttemptTimeout(10*time.Second))
		start := time.Now()
		_, err := aeadOf(t, c, east, ledger).Decrypt([]byte("ct"), nil)
		if status.Code(err) != codes.DeadlineExceeded || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Decrypt = %v, want DeadlineExceeded", err)
		}
		if el := time.Since(start); el > 100*time.Millisecond+3*time.Second {
			t.Errorf("Decrypt returned after %v, want about 100ms", el)
		}
	})

	t.Run("canceled during backoff", func(t *testing.T) {
		down := startFake(t, pki, fakeEast2, answerCode(codes.Unavailable))
		entered := make(chan struct{}, 1)
		forever := kmsclient.WithSleep(func(ctx context.Context, d time.Duration) error {
			entered <- struct{}{}
			<-ctx.Done()
			return ctx.Err()
		})
		c := fakeClient(t, pki, kmsclient.WithEndpoints(east, down.addr), forever)
		ctx, cancel := context.WithCancel(t.Context())
		go func() { <-entered; cancel() }()
		_, err := aeadOf(t, c, east, ledger).EncryptWithContext(ctx, []byte("pt"), nil)
		if status.Code(err) != codes.Canceled || !errors.Is(err, context.Canceled) {
			t.Errorf("Encrypt = %v, want Canceled", err)
		}
		if !strings.Contains(err.Error(), "after 1 attempts on 1 of 1 endpoints (last error from "+down.addr) {
			t.Errorf("error %q does not report the attempt and its failure", err)
		}
		if got := down.calls.Load(); got != 1 {
			t.Errorf("the server got %d calls, want 1", got)
		}
	})

	t.Run("already canceled", func(t *testing.T) {
		f.calls.Store(0)
		c := fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr))
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		_, err := aeadOf(t, c, east, ledger).EncryptWithContext(ctx, []byte("pt"), nil)
		if status.Code(err) != codes.Canceled || !errors.Is(err, context.Canceled) {
			t.Errorf("Encrypt = %v, want Canceled", err)
		}
		if got := f.calls.Load(); got != 0 {
			t.Errorf("the server got %d calls, want 0", got)
		}
	})
}

// TestFallbackBudgets: a decrypt falls back without pausing when the primary
// region's only endpoint fails; each region has its own attempt budget; an
// encrypt uses its region alone.
func TestFallbackBudgets(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	fe := startFake(t, pki, fakeEast1, answerCode(codes.Unavailable))
	fw := startFake(t, pki, "spiffe://cairn.test/kms/us-west/fake-1", answerCode(codes.OK))
	sleeps := &sleepRecorder{}
	policy := kmsclient.RetryPolicy{MaxAttempts: 2, InitialBackoff: time.Millisecond, MaxBackoff: time.Millisecond}
	c := fakeClient(t, pki, kmsclient.WithEndpoints(east, fe.addr), kmsclient.WithEndpoints(west, fw.addr),
		kmsclient.WithDecryptFallback(east, west), kmsclient.WithRetry(policy), sleeps.option())
	a := aeadOf(t, c, east, ledger)

	if got, err := a.Decrypt([]byte("ct"), nil); err != nil || string(got) != "fake plaintext" {
		t.Fatalf("Decrypt = %q, %v, want the fallback's answer", got, err)
	}
	if e, w := fe.calls.Load(), fw.calls.Load(); e != 1 || w != 1 || len(sleeps.pauses()) != 0 {
		t.Errorf("calls us-east %d, us-west %d, pauses %v; want 1, 1, none", e, w, sleeps.pauses())
	}

	fw.set(answerCode(codes.Unavailable))
	fe.calls.Store(0)
	fw.calls.Store(0)
	_, err := a.Decrypt([]byte("ct"), nil)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("Decrypt = %v, want Unavailable", err)
	}
	if e, w := fe.calls.Load(), fw.calls.Load(); e != 2 || w != 2 {
		t.Errorf("calls us-east %d, us-west %d, want 2 and 2", e, w)
	}
	for _, want := range []string{"in region us-east and its decrypt fallbacks us-west", "4 attempts on 2 of 2 endpoints"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}

	fe.calls.Store(0)
	fw.calls.Store(0)
	if _, err := a.Encrypt([]byte("pt"), nil); status.Code(err) != codes.Unavailable {
		t.Errorf("Encrypt = %v, want Unavailable", err)
	}
	if e, w := fe.calls.Load(), fw.calls.Load(); e != 2 || w != 0 {
		t.Errorf("Encrypt calls us-east %d, us-west %d, want 2 and 0", e, w)
	}
}

// TestRefusedServers: servers that are not KMSs of the region in the
// client's trust domain are refused in the handshake and never called.
func TestRefusedServers(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	other := identitytest.New(t, spiffeid.RequireTrustDomainFromString("other.test"))
	tests := []struct {
		name    string
		pki     *identitytest.PKI
		id      string
		wantMsg string
	}{
		{"KMS of another region", pki, "spiffe://cairn.test/kms/us-west/kms-1", "is not a KMS of region us-east"},
		{"not a KMS", pki, "spiffe://cairn.test/client/us-east/kms-1", "is not a KMS of region us-east"},
		{"root KMS", pki, "spiffe://cairn.test/rootkms/us-east/kms-1", "is not a KMS of region us-east"},
		{"other trust domain", other, "spiffe://other.test/kms/us-east/kms-1", "handshake"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := startFake(t, tc.pki, tc.id, answerCode(codes.OK))
			c := fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr),
				kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 2, InitialBackoff: time.Millisecond, MaxBackoff: time.Millisecond}))
			got, err := aeadOf(t, c, east, ledger).Encrypt([]byte("pt"), nil)
			if err == nil || got != nil {
				t.Fatalf("Encrypt = %q, %v, want an error", got, err)
			}
			if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("Encrypt = %v, want Unavailable containing %q", err, tc.wantMsg)
			}
			if n := f.calls.Load(); n != 0 {
				t.Errorf("the refused server got %d calls", n)
			}
		})
	}
}

// TestStartEndpoint: by default a client's first call goes to a random
// endpoint of the region, so clients configured alike spread over its
// servers; with WithListedOrder it goes to the first listed.
func TestStartEndpoint(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	fa := startFake(t, pki, fakeEast1, answerCode(codes.OK))
	fb := startFake(t, pki, fakeEast2, answerCode(codes.OK))
	const clients = 40
	for range clients {
		c, err := kmsclient.New(kmsclient.WithSource(pki.Source(appID)), kmsclient.WithEndpoints(east, fa.addr, fb.addr))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = aeadOf(t, c, east, ledger).Encrypt([]byte("pt"), nil)
		c.Close()
	}
	// All 40 on one endpoint has probability 2^-39.
	if a, b := fa.calls.Load(), fb.calls.Load(); a+b != clients || a == 0 || b == 0 {
		t.Errorf("first calls of %d clients: %d on the first endpoint, %d on the second; want both used", clients, a, b)
	}
	before := fa.calls.Load()
	for range 5 {
		c, err := kmsclient.New(kmsclient.WithSource(pki.Source(appID)), kmsclient.WithEndpoints(east, fa.addr, fb.addr), kmsclient.WithListedOrder())
		if err != nil {
			t.Fatal(err)
		}
		_, _ = aeadOf(t, c, east, ledger).Encrypt([]byte("pt"), nil)
		c.Close()
	}
	if got := fa.calls.Load() - before; got != 5 {
		t.Errorf("with WithListedOrder, %d of 5 first calls went to the first endpoint, want 5", got)
	}
}

// TestOversizeRefusedLocally: an input over WithMaxPayload fails at once
// with InvalidArgument and never reaches a server (where, past the message
// limit, it would come back as ResourceExhausted and be retried); at the
// limit it is sent.
func TestOversizeRefusedLocally(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	f := startFake(t, pki, fakeEast1, answerCode(codes.OK))
	const limit = 100
	a := aeadOf(t, fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr), kmsclient.WithMaxPayload(limit)), east, ledger)
	big, atLimit := make([]byte, limit+1), make([]byte, limit)
	for _, tt := range []struct {
		name string
		call func() ([]byte, error)
	}{
		{"plaintext", func() ([]byte, error) { return a.Encrypt(big, nil) }},
		{"associated data of an encrypt", func() ([]byte, error) { return a.Encrypt(atLimit, big) }},
		{"ciphertext", func() ([]byte, error) { return a.Decrypt(make([]byte, limit+1024+1), nil) }},
		{"associated data of a decrypt", func() ([]byte, error) { return a.Decrypt(atLimit, big) }},
	} {
		out, err := tt.call()
		if status.Code(err) != codes.InvalidArgument || out != nil || !strings.Contains(err.Error(), "WithMaxPayload") {
			t.Errorf("oversize %s: %q, %v; want InvalidArgument naming WithMaxPayload", tt.name, out, err)
		}
	}
	if n := f.calls.Load(); n != 0 {
		t.Errorf("the server saw %d calls for oversize inputs, want 0", n)
	}
	if _, err := a.Encrypt(atLimit, atLimit); err != nil {
		t.Errorf("Encrypt at the limit = %v", err)
	}
	if _, err := a.Decrypt(make([]byte, limit+1024), atLimit); err != nil {
		t.Errorf("Decrypt at the limit = %v", err)
	}
	if n := f.calls.Load(); n != 2 {
		t.Errorf("the server saw %d calls at the limit, want 2", n)
	}
	if _, err := kmsclient.New(kmsclient.WithSource(pki.Source(appID)), kmsclient.WithEndpoints(east, f.addr), kmsclient.WithMaxPayload(0)); err == nil {
		t.Error("New(WithMaxPayload(0)) = nil error")
	}
}

// answerRetryAfter answers RESOURCE_EXHAUSTED with a RetryInfo of d, as a
// KMS over its caller's quota does.
func answerRetryAfter(d time.Duration) func(context.Context) error {
	return func(context.Context) error {
		st, err := status.New(codes.ResourceExhausted, "fake: over quota").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(d)})
		if err != nil {
			panic(err)
		}
		return st.Err()
	}
}

// TestRetryInfoHonoured: a RESOURCE_EXHAUSTED with a RetryInfo makes the
// pause before the next round at least the hint, however short the
// client's own backoff; a hint past the call's deadline ends the call at
// once, with the server's answer; without a hint the backoff is the
// client's own.
func TestRetryInfoHonoured(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	policy := kmsclient.RetryPolicy{MaxAttempts: 3, InitialBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond}
	tests := []struct {
		name       string
		hint       time.Duration // 0: no RetryInfo
		timeout    time.Duration
		wantPauses int
		minPause   time.Duration
		maxElapsed time.Duration
	}{
		{"hint honoured", 40 * time.Millisecond, 5 * time.Second, 2, 40 * time.Millisecond, 5 * time.Second},
		{"no hint", 0, 5 * time.Second, 2, 0, 5 * time.Second},
		{"hint past the deadline", 10 * time.Second, 2 * time.Second, 0, 0, time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			answer := answerCode(codes.ResourceExhausted)
			if tc.hint > 0 {
				answer = answerRetryAfter(tc.hint)
			}
			f := startFake(t, pki, fakeEast1, answer)
			sleeps := &sleepRecorder{}
			c := fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr), kmsclient.WithRetry(policy), kmsclient.WithTimeout(tc.timeout), sleeps.option())
			start := time.Now()
			_, err := aeadOf(t, c, east, ledger).Encrypt([]byte("pt"), nil)
			elapsed := time.Since(start)
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("Encrypt = %v, want ResourceExhausted", err)
			}
			pauses := sleeps.pauses()
			if len(pauses) != tc.wantPauses {
				t.Fatalf("pauses = %v, want %d", pauses, tc.wantPauses)
			}
			for i, d := range pauses {
				if d < tc.minPause {
					t.Errorf("pause %d = %v, want at least the hint %v", i, d, tc.minPause)
				}
				if tc.hint == 0 && d >= policy.MaxBackoff {
					t.Errorf("pause %d = %v without a hint, want < MaxBackoff %v", i, d, policy.MaxBackoff)
				}
			}
			if elapsed > tc.maxElapsed {
				t.Errorf("Encrypt took %v, want at most %v", elapsed, tc.maxElapsed)
			}
		})
	}
}
