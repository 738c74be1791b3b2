package tests

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// The catalogue's case 26, load at 2x a client's quota: a noisy client
// offers twice the rate its bundle quota allows, and a quiet client on the
// same KMS server keeps its latency and gets no error.
const (
	quotaNoisy = "client/us-east/noisy"
	quotaQuiet = "client/us-east/quiet"
	// quotaRate is the noisy client's quota (requests per second, burst
	// quotaBurst); it offers 2 x quotaRate.
	quotaRate, quotaBurst = 100, 10
	// quotaRounds alternate unloaded and loaded phases of quotaPhase each,
	// so that both p99s are measured in the same run, interleaved.
	quotaRounds = 8
	quotaPhase  = time.Second
	// quotaQuietGap paces the quiet client (closed loop, one call at a
	// time, then this pause).
	quotaQuietGap = 500 * time.Microsecond
)

// TestKMSQuotaUnderLoad: regionctl builds a bundle with a quota for the
// noisy client (from its config file's "quotas"); a real KMS process serves
// it. The noisy client, through kmsclient with one attempt per call, offers
// 2x its quota: the excess gets RESOURCE_EXHAUSTED with a RetryInfo, nothing
// else fails. The quiet client (kmsclient, default retries) gets no error;
// its p99 while the noisy client runs, against its p99 while it does not,
// is logged with the 1.5x goal (not asserted: a timing gate). The KMS audits the noisy client's refusals once per window with
// their count, not once per call. No file, and no error string a client
// saw, holds a key of the chain or the DEK.
func TestKMSQuotaUnderLoad(t *testing.T) {
	c := startOneRegionChain(t, oneRegion{team: ledgerTeam,
		regionctlConfig: fmt.Sprintf(`{"quotas": {"callers": [{"pattern": %q, "requests_per_second": %d, "burst": %d}]}}`, quotaNoisy, quotaRate, quotaBurst)})
	w, k := c.w, c.k
	w.Mint(quotaNoisy, quotaQuiet)
	// The error strings the clients saw, each once, for the secret scan.
	var errMu sync.Mutex
	errSeen := map[string]bool{}
	sawErr := func(err error) {
		errMu.Lock()
		defer errMu.Unlock()
		errSeen[err.Error()] = true
	}

	client := func(name string, opts ...kmsclient.Option) *kmsclient.AEAD {
		c, err := kmsclient.New(append([]kmsclient.Option{kmsclient.WithSource(w.Source(name)), kmsclient.WithEndpoints(kmsRegion, k.Addr)}, opts...)...)
		if err != nil {
			t.Fatalf("kmsclient.New(%s) = %v", name, err)
		}
		t.Cleanup(func() { c.Close() })
		a, err := c.AEAD(kmsRegion, kmsKeyset)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	noisy := client(quotaNoisy, kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 1}))
	quiet := client(quotaQuiet)
	dek := []byte("a 32-byte data encryption key!!!")
	ct, err := quiet.EncryptWithContext(t.Context(), dek, []byte("quota"))
	if err != nil {
		t.Fatal(err)
	}

	// The noisy client: four pacers of quotaRate/2 calls per second each,
	// running while loaded is set.
	var (
		loaded                           atomic.Bool
		noisyOK, noisyRefused, noisyHint atomic.Int64
		noisyOther                       atomic.Int64
		otherErr                         atomic.Pointer[error]
	)
	ctx, stop := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	const pacers = 4
	for range pacers {
		wg.Go(func() {
			tick := time.NewTicker(time.Second * pacers / (2 * quotaRate))
			defer tick.Stop()
			var calls sync.WaitGroup
			defer calls.Wait()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				if !loaded.Load() {
					continue
				}
				calls.Go(func() {
					cctx, cancel := context.WithTimeout(ctx, kmsCallTTL)
					defer cancel()
					_, err := noisy.EncryptWithContext(cctx, dek, []byte("noisy"))
					if err != nil {
						sawErr(err)
					}
					switch {
					case err == nil:
						noisyOK.Add(1)
					case status.Code(err) == codes.ResourceExhausted:
						noisyRefused.Add(1)
						for _, d := range status.Convert(err).Details() {
							if ri, ok := d.(*errdetails.RetryInfo); ok && ri.GetRetryDelay().AsDuration() > 0 {
								noisyHint.Add(1)
							}
						}
					case ctx.Err() == nil:
						noisyOther.Add(1)
						otherErr.Store(&err)
					}
				})
			}
		})
	}

	// The quiet client, interleaving unloaded and loaded phases.
	var unloadedLat, loadedLat []time.Duration
	quietErrs := 0
	start := time.Now()
	for round := range 2 * quotaRounds {
		load := round%2 == 1
		loaded.Store(load)
		phaseEnd := time.Now().Add(quotaPhase)
		for time.Now().Before(phaseEnd) {
			cctx, cancel := context.WithTimeout(ctx, kmsCallTTL)
			t0 := time.Now()
			pt, err := quiet.DecryptWithContext(cctx, ct, []byte("quota"))
			lat := time.Since(t0)
			cancel()
			if err != nil {
				sawErr(err)
			}
			if err != nil || string(pt) != string(dek) {
				quietErrs++
				if quietErrs <= 3 {
					t.Errorf("quiet client Decrypt (loaded %v) = %v", load, err)
				}
			}
			if load {
				loadedLat = append(loadedLat, lat)
			} else {
				unloadedLat = append(unloadedLat, lat)
			}
			time.Sleep(quotaQuietGap)
		}
	}
	loaded.Store(false)
	stop()
	wg.Wait()
	elapsed := time.Since(start)

	p := func(lat []time.Duration, q float64) time.Duration {
		s := slices.Clone(lat)
		slices.Sort(s)
		return s[min(len(s)-1, int(q*float64(len(s))))]
	}
	total := noisyOK.Load() + noisyRefused.Load() + noisyOther.Load()
	share := float64(noisyRefused.Load()) / float64(max(total, 1))
	up99, lp99 := p(unloadedLat, 0.99), p(loadedLat, 0.99)
	t.Logf("noisy client at 2x its quota (%d/s, burst %d) for %v loaded: %d calls, %d admitted, %d refused (%.1f%%), %d with a RetryInfo, %d other errors",
		quotaRate, quotaBurst, quotaRounds*quotaPhase, total, noisyOK.Load(), noisyRefused.Load(), 100*share, noisyHint.Load(), noisyOther.Load())
	t.Logf("quiet client: %d errors; unloaded %d calls p50 %v p99 %v; loaded %d calls p50 %v p99 %v; p99 ratio %.2f (limit 1.5)",
		quietErrs, len(unloadedLat), p(unloadedLat, 0.5), up99, len(loadedLat), p(loadedLat, 0.5), lp99, float64(lp99)/float64(up99))

	if n := noisyOther.Load(); n > 0 {
		t.Errorf("noisy client: %d errors other than ResourceExhausted, e.g. %v", n, *otherErr.Load())
	}
	// Offered 2x: about half is refused (the burst and pacing jitter move
	// it a little).
	if share < 0.35 || share > 0.65 {
		t.Errorf("noisy client refused share = %.2f, want about 0.5 (offered twice its quota)", share)
	}
	if noisyHint.Load() != noisyRefused.Load() {
		t.Errorf("refusals with a RetryInfo = %d of %d, want all", noisyHint.Load(), noisyRefused.Load())
	}
	if quietErrs > 0 {
		t.Errorf("quiet client: %d errors, want 0", quietErrs)
	}
	if len(unloadedLat) < 1000 || len(loadedLat) < 1000 {
		t.Fatalf("quiet client samples: %d unloaded, %d loaded; want at least 1000 each", len(unloadedLat), len(loadedLat))
	}
	// The p99 ratio is logged above with its 1.5x goal, not asserted: a
	// timing gate in a test fails on a busy machine (the house rules keep
	// speed for benchmarks); a ratio above the goal is flagged in the log.
	if lp99 > up99*3/2 {
		t.Logf("NOTE: quiet client p99 loaded %v is ABOVE 1.5 x unloaded %v on this run (reported, not asserted)", lp99, up99)
	}

	// The refusals are in the audit log once per window (10s) per caller,
	// with their count; the KMS writes the last window's at shutdown.
	k.Stop()
	recs, err := audit.ReadFile(filepath.Join(k.StateDir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	var records, counted int64
	for _, r := range recs {
		if r.Operation != "/cairn.kms.v1.KMS/*" {
			continue
		}
		if r.Identity != framework.SPIFFEID(quotaNoisy) {
			t.Errorf("quota record of %s, want only the noisy client's: %+v", r.Identity, r)
			continue
		}
		records++
		n, err := strconv.ParseInt(strings.Fields(r.Reason)[0], 10, 64)
		if err != nil || r.Code != "ResourceExhausted" || r.Outcome != audit.OutcomeDenied {
			t.Errorf("quota record %+v: want ResourceExhausted, denied, and the count first in the reason", r)
		}
		counted += n
	}
	windows := int64(elapsed/(10*time.Second)) + 2
	t.Logf("audit: %d quota records counting %d refusals over %v", records, counted, elapsed.Round(time.Millisecond))
	if counted != noisyRefused.Load() || records == 0 || records > windows {
		t.Errorf("audit: %d quota records counting %d refusals; want at most %d records (one per window) counting all %d", records, counted, windows, noisyRefused.Load())
	}

	// No secret in any file, nor in any error string a client saw: the
	// region key, the keyset's keys and the DEK both clients encrypted.
	var errs []string
	for e := range errSeen {
		errs = append(errs, e)
	}
	slices.Sort(errs)
	writeErrorStrings(t, w, "client-errors.txt", errs)
	c.requireNoSecrets(t, []framework.Secret{sentinel("the DEK the clients encrypt", dek)})
}
