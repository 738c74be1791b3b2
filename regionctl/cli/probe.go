package cli

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"

	"github.com/cairnkms/cairn/internal/identity"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// Golden probes. The root KMS records, with every version it adds, a golden
// ciphertext made with exactly that key (rootkms/golden.go). Every KMS
// server serving a keyset must decrypt the golden ciphertext of every
// version the record says decrypts (ENABLED or PRIMARY) to the recorded
// SHA-256 (KMSAdmin.Probe): a server whose copy lacks a version, or holds
// other key material under its ID, fails. regionctl probe runs them once;
// a rollout runs them after every stage (probeServers), and any failure
// fails the stage's gate.

// goldenProbe is one golden ciphertext every server of a region must
// decrypt: version KeyID of Keyset, as the record holds it. Golden is nil
// for a version made before golden ciphertexts, which cannot be probed.
type goldenProbe struct {
	Keyset string
	KeyID  uint32
	Golden *statev1.GoldenCiphertext
}

// goldenProbes returns the golden ciphertexts every server of region must
// decrypt: those of every version of every keyset of records served in
// region whose record state decrypts (ENABLED or PRIMARY), sorted by keyset
// and key ID. unprobed lists, in the same order, the versions that should
// decrypt but have no golden ciphertext (made before golden ciphertexts).
func goldenProbes(records []*statev1.KeysetRecord, region string) (probes, unprobed []goldenProbe) {
	for _, rec := range records {
		if !slices.Contains(rec.GetRegions(), region) {
			continue
		}
		vs := slices.Clone(rec.GetVersions())
		slices.SortFunc(vs, func(a, b *statev1.KeysetVersionRecord) int { return cmp.Compare(a.GetKeyId(), b.GetKeyId()) })
		for _, v := range vs {
			switch v.GetState() {
			case statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED, statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY:
			default:
				continue
			}
			p := goldenProbe{Keyset: rec.GetName(), KeyID: v.GetKeyId(), Golden: v.GetGolden()}
			if p.Golden == nil {
				unprobed = append(unprobed, p)
				continue
			}
			probes = append(probes, p)
		}
	}
	slices.SortStableFunc(probes, func(a, b goldenProbe) int { return strings.Compare(a.Keyset, b.Keyset) })
	slices.SortStableFunc(unprobed, func(a, b goldenProbe) int { return strings.Compare(a.Keyset, b.Keyset) })
	return probes, unprobed
}

// probeFailure is one golden probe a server failed, or, with no Keyset, the
// server itself: unreachable, not serving, or refusing the probe.
type probeFailure struct {
	Keyset string `json:"keyset,omitempty"`
	KeyID  uint32 `json:"key_id,omitempty"`
	Detail string `json:"detail"`
}

func (f probeFailure) String() string {
	if f.Keyset == "" {
		return f.Detail
	}
	return fmt.Sprintf("keyset %s version %d: %s", f.Keyset, f.KeyID, f.Detail)
}

// serverProbe is what one server answered to its region's golden probes.
type serverProbe struct {
	Region  string `json:"region"`
	Address string `json:"address"`
	// ID is the SPIFFE ID the server proved in the TLS handshake.
	ID       string         `json:"id,omitempty"`
	Probes   int            `json:"probes"`
	Passed   int            `json:"passed"`
	Failures []probeFailure `json:"failures,omitempty"`
}

// OK reports whether the server passed every probe.
func (s *serverProbe) OK() bool { return len(s.Failures) == 0 }

// probeBatch is the most golden ciphertexts one Probe call carries: well
// under a KMS server's default batch limit (kms.DefaultMaxBatch).
const probeBatch = 500

// probeServers asks every KMS server of every region of servers (region →
// KMSAdmin addresses) to decrypt the golden ciphertexts probes[region]
// (goldenProbes), concurrently, each call with its own timeout; only
// servers proving a kms/<region>/* identity of the region are accepted. It
// returns the failures of every server that did not pass, by address: a
// server passes when it answers and every probe decrypts, with the version
// the probe names, to the recorded SHA-256. An unreachable or not-serving
// server fails with one failure naming no keyset; so does an address that
// reaches the same server as another address of the region (one server
// must not stand in for another nobody probed). A server of a region with
// no probes is still asked (an empty Probe), so it must be reachable and
// serving. An empty map: every server passed. The error is for what stops
// the probing itself (bad credentials), never for a server's failure.
//
// This is the rollout's golden-probe gate: probeServers(ctx, src, the
// stage's servers, probes built from the record, timeout), and any entry in
// the map fails the stage.
func probeServers(ctx context.Context, src *identity.Source, servers map[string][]string, probes map[string][]goldenProbe, timeout time.Duration) (map[string][]probeFailure, error) {
	results, err := probeFleet(ctx, src, servers, probes, timeout)
	if err != nil {
		return nil, err
	}
	out := map[string][]probeFailure{}
	for _, r := range results {
		if !r.OK() {
			out[r.Address] = append(out[r.Address], r.Failures...) // an address listed in two regions: both
		}
	}
	return out, nil
}

// probeFleet is probeServers with every server's result, sorted by region
// and address.
func probeFleet(ctx context.Context, src *identity.Source, servers map[string][]string, probes map[string][]goldenProbe, timeout time.Duration) ([]*serverProbe, error) {
	regions := sortedRegions(servers)
	creds := make(map[string]*identity.Credentials, len(regions))
	for _, region := range regions {
		c, err := kmsCreds(src, region)
		if err != nil {
			return nil, err
		}
		creds[region] = c
	}
	var out []*serverProbe
	var wg sync.WaitGroup
	for _, region := range regions {
		for _, addr := range servers[region] {
			r := &serverProbe{Region: region, Address: addr, Probes: len(probes[region])}
			out = append(out, r)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := probeServer(ctx, r, creds[region], probes[region], timeout); err != nil {
					r.Failures = append(r.Failures, probeFailure{Detail: "probe failed: " + err.Error()})
				}
			}()
		}
	}
	wg.Wait()
	for _, region := range regions {
		sameServerProbe(out, region)
	}
	slices.SortStableFunc(out, func(a, b *serverProbe) int {
		if c := strings.Compare(a.Region, b.Region); c != 0 {
			return c
		}
		return strings.Compare(a.Address, b.Address)
	})
	return out, nil
}

// probeServer sends probes to one server over one connection, in batches
// of probeBatch, each call with its own timeout (a region with no probes
// still gets one empty call: the server must answer), and records in r the
// SPIFFE ID the server proved and each probe's outcome. An error is the
// server's failure as a whole (unreachable, not serving, refusing).
func probeServer(ctx context.Context, r *serverProbe, creds *identity.Credentials, probes []goldenProbe, timeout time.Duration) error {
	conn, err := grpc.NewClient(r.Address, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	c := kmsv1.NewKMSAdminClient(conn)
	for start := 0; ; start += probeBatch {
		batch := probes[start:min(start+probeBatch, len(probes))]
		req := &kmsv1.ProbeRequest{}
		for _, g := range batch {
			req.Probes = append(req.Probes, &kmsv1.GoldenProbe{Keyset: g.Keyset, Ciphertext: g.Golden.GetCiphertext(),
				AssociatedData: g.Golden.GetAssociatedData(), PlaintextSha256: g.Golden.GetPlaintextSha256()})
		}
		var p peer.Peer
		callCtx, cancel := context.WithTimeout(ctx, timeout)
		resp, err := c.Probe(callCtx, req, grpc.Peer(&p))
		cancel()
		if info, ok := p.AuthInfo.(identity.AuthInfo); ok {
			r.ID = info.ID.String()
		}
		if err != nil {
			return err
		}
		if len(resp.GetResults()) != len(batch) {
			return fmt.Errorf("answered %d results to %d probes", len(resp.GetResults()), len(batch))
		}
		for i, res := range resp.GetResults() {
			if f, ok := judgeProbe(batch[i], res); ok {
				r.Passed++
			} else {
				r.Failures = append(r.Failures, f)
			}
		}
		if start+probeBatch >= len(probes) {
			return nil
		}
	}
}

// judgeProbe checks one probe result: decrypted, to the recorded SHA-256,
// with the version the probe names.
func judgeProbe(g goldenProbe, res *kmsv1.ProbeResult) (probeFailure, bool) {
	f := probeFailure{Keyset: g.Keyset, KeyID: g.KeyID}
	switch {
	case res.GetOk() && res.GetKeyId() == g.KeyID:
		return f, true
	case res.GetOk():
		f.Detail = fmt.Sprintf("decrypted by version %d, not %d", res.GetKeyId(), g.KeyID)
	case res.GetKeyId() == 0 && strings.HasPrefix(res.GetDetail(), "no keyset"):
		f.Detail = "not served: the server serves no such keyset"
	case res.GetKeyId() == 0:
		// The golden ciphertext names its version by its TINK prefix: no
		// version routed means the server's copy lacks it.
		f.Detail = "not served: the server's copy of the keyset lacks this version"
	default:
		f.Detail = res.GetDetail()
		if f.Detail == "" {
			f.Detail = "failed"
		}
	}
	return f, false
}

// sameServerProbe fails every server of region whose address reached the
// same server (by SPIFFE ID) as another address of the region.
func sameServerProbe(results []*serverProbe, region string) {
	addrs := map[string][]string{}
	for _, r := range results {
		if r.Region == region && r.ID != "" {
			addrs[r.ID] = append(addrs[r.ID], r.Address)
		}
	}
	for _, r := range results {
		if a := addrs[r.ID]; r.Region == region && r.ID != "" && len(a) > 1 {
			r.Failures = append(r.Failures, probeFailure{Detail: fmt.Sprintf("%s answers at %v: list each KMS server of the region once, by its own address", r.ID, a)})
		}
	}
}

// probeRegionReport is regionctl probe's report of one region.
type probeRegionReport struct {
	Region   string          `json:"region"`
	Probes   int             `json:"probes"`
	Unprobed []probedVersion `json:"unprobed,omitempty"`
	Servers  []*serverProbe  `json:"servers"`
}

// probedVersion names a version in the report.
type probedVersion struct {
	Keyset string `json:"keyset"`
	KeyID  uint32 `json:"key_id"`
}

// probeCmd is regionctl probe.
func probeCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("probe", stderr)
	o := &options{}
	o.register(fs, withRoot|withKMS|withJSON)
	var region string
	fs.StringVar(&region, "region", "", "only this region")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	servers, err := o.regions(region)
	if err != nil {
		return err
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	records, err := r.listKeysets(ctx, region, false)
	if err != nil {
		return fmt.Errorf("reading the record: %w", err)
	}
	src, err := o.source()
	if err != nil {
		return err
	}
	probes := map[string][]goldenProbe{}
	var report []*probeRegionReport
	for _, region := range sortedRegions(servers) {
		p, unprobed := goldenProbes(records, region)
		probes[region] = p
		rr := &probeRegionReport{Region: region, Probes: len(p), Servers: []*serverProbe{}}
		for _, u := range unprobed {
			rr.Unprobed = append(rr.Unprobed, probedVersion{Keyset: u.Keyset, KeyID: u.KeyID})
		}
		report = append(report, rr)
	}
	results, err := probeFleet(ctx, src, servers, probes, o.timeout)
	if err != nil {
		return err
	}
	failed := 0
	for _, res := range results {
		i := slices.IndexFunc(report, func(rr *probeRegionReport) bool { return rr.Region == res.Region })
		report[i].Servers = append(report[i].Servers, res)
		if !res.OK() {
			failed++
		}
	}
	if o.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(report); err != nil {
			return err
		}
	} else {
		printProbeReport(stdout, report)
	}
	if failed > 0 {
		var names []string
		for _, res := range results {
			if !res.OK() {
				names = append(names, res.Region+"/"+res.Address)
			}
		}
		return fmt.Errorf("golden probes failed on %d of %d server(s): %s", failed, len(results), strings.Join(names, ", "))
	}
	return nil
}

func printProbeReport(w io.Writer, report []*probeRegionReport) {
	for _, rr := range report {
		fmt.Fprintf(w, "region %s: %d golden ciphertext(s)\n", rr.Region, rr.Probes)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  SERVER\tRESULT\tPASSED")
		for _, s := range rr.Servers {
			result := "ok"
			if !s.OK() {
				result = "FAILED"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%d/%d\n", s.Address, result, s.Passed, s.Probes)
		}
		tw.Flush()
		for _, s := range rr.Servers {
			for _, f := range s.Failures {
				fmt.Fprintf(w, "  failed: %s: %s\n", s.Address, f)
			}
		}
		for _, u := range rr.Unprobed {
			fmt.Fprintf(w, "  not probed: keyset %s version %d has no golden ciphertext (added before golden probes)\n", u.Keyset, u.KeyID)
		}
	}
}
