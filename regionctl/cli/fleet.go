package cli

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lifecycle"
	"github.com/cairnkms/cairn/internal/safety"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// serverObs is one KMS server's GetStatus answer, or why there is none.
type serverObs struct {
	Region, Addr string
	// ID is the SPIFFE ID the server proved in the TLS handshake.
	ID     string
	Status *kmsv1.GetStatusResponse
	Err    error
}

// observation is what every configured KMS server reported, by region.
type observation struct {
	At      time.Time
	Regions map[string][]serverObs
}

// kmsCreds accepts only KMS servers of region.
func kmsCreds(src *identity.Source, region string) (*identity.Credentials, error) {
	allow, err := identity.ParseAllowlist(src.TrustDomain(), "kms/"+region+"/*")
	if err != nil {
		return nil, err
	}
	return identity.ClientCredentials(src, allow.Authorize), nil
}

func kmsCall[T any](ctx context.Context, addr string, creds *identity.Credentials, timeout time.Duration, call func(context.Context, kmsv1.KMSAdminClient) (T, error)) (T, error) {
	var zero T
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return zero, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return call(ctx, kmsv1.NewKMSAdminClient(conn))
}

// observe asks every server of every region for its status, concurrently,
// each call with its own timeout.
func observe(ctx context.Context, src *identity.Source, regions map[string][]string, timeout time.Duration) (*observation, error) {
	obs := &observation{At: clockNow(ctx), Regions: map[string][]serverObs{}}
	var wg sync.WaitGroup
	for region, addrs := range regions {
		creds, err := kmsCreds(src, region)
		if err != nil {
			return nil, err
		}
		servers := make([]serverObs, len(addrs))
		obs.Regions[region] = servers
		for i, addr := range addrs {
			servers[i] = serverObs{Region: region, Addr: addr}
			wg.Add(1)
			go func() {
				defer wg.Done()
				var p peer.Peer
				servers[i].Status, servers[i].Err = kmsCall(ctx, addr, creds, timeout, func(ctx context.Context, c kmsv1.KMSAdminClient) (*kmsv1.GetStatusResponse, error) {
					return c.GetStatus(ctx, &kmsv1.GetStatusRequest{IncludeKeysets: true}, grpc.Peer(&p))
				})
				if info, ok := p.AuthInfo.(identity.AuthInfo); ok {
					servers[i].ID = info.ID.String()
				}
				if servers[i].Err == nil && servers[i].Status.GetRegion() != "" && servers[i].Status.GetRegion() != region {
					servers[i].Err = fmt.Errorf("serves region %s, not %s", servers[i].Status.GetRegion(), region)
				}
			}()
		}
	}
	wg.Wait()
	for _, servers := range obs.Regions {
		sameServer(servers)
	}
	return obs, nil
}

// sameServer fails every server whose address reached the same server as
// another address of the region (two addresses of one server, or a load
// balancer in front of several): counted twice, one server would stand in
// for another nobody looked at, and "every server serves it" could be wrong.
func sameServer(servers []serverObs) {
	addrs := map[string][]string{}
	for _, s := range servers {
		if s.Err == nil && s.ID != "" {
			addrs[s.ID] = append(addrs[s.ID], s.Addr)
		}
	}
	for i, s := range servers {
		if a := addrs[s.ID]; s.Err == nil && len(a) > 1 {
			servers[i].Err = fmt.Errorf("%s answers at %v: list each KMS server of the region once, by its own address", s.ID, a)
		}
	}
}

func (o *observation) unreachable(region string) []serverObs {
	var out []serverObs
	for _, s := range o.Regions[region] {
		if s.Err != nil {
			out = append(out, s)
		}
	}
	return out
}

// maxSerial is the highest bundle serial any server of region serves.
func (o *observation) maxSerial(region string) uint64 {
	var m uint64
	for _, s := range o.Regions[region] {
		m = max(m, s.Status.GetBundle().GetSerial())
	}
	return m
}

func decrypts(s cryptov1.KeyStatus) bool {
	return s == cryptov1.KeyStatus_KEY_STATUS_ENABLED || s == cryptov1.KeyStatus_KEY_STATUS_PRIMARY
}

// servedContent is what a server serves, as the Safety Condition reads it.
func servedContent(st *kmsv1.GetStatusResponse) safety.Content {
	c := safety.Content{}
	for _, k := range st.GetKeysets() {
		vs := map[uint32]safety.Serving{}
		for _, v := range k.GetVersions() {
			primary := v.GetStatus() == cryptov1.KeyStatus_KEY_STATUS_PRIMARY
			vs[v.GetKeyId()] = safety.Serving{Decrypts: decrypts(v.GetStatus()), Primary: primary}
		}
		c[k.GetKeyset()] = vs
	}
	return c
}

// fleet is the observation as the Safety Condition reads it. A server that
// did not answer, or that is still loading a persisted bundle, is not Known
// (it counts as in use). A server that lost its
// usage history at a boot reports every version it served then as used and
// encrypted with at that boot (history_lost), which is what the Safety
// Condition needs: no later use is unknown. Counting it as used at every
// observation instead would keep the version from ever retiring.
func (o *observation) fleet() safety.Fleet {
	var f safety.Fleet
	for _, region := range slices.Sorted(maps.Keys(o.Regions)) {
		for _, s := range o.Regions[region] {
			// A server that serves nothing but holds a persisted bundle will
			// serve it (with its persisted usage) as soon as it can load it:
			// what it serves and has used is unknown, not nothing.
			srv := safety.Server{Region: region, Name: s.Addr, Known: s.Err == nil && s.Status.GetPendingBundle() == nil}
			if s.Err == nil {
				srv.Keysets = map[string]safety.ServedKeyset{}
				for _, k := range s.Status.GetKeysets() {
					vs := map[uint32]safety.ServedVersion{}
					for _, v := range k.GetVersions() {
						sv := safety.ServedVersion{Decrypts: decrypts(v.GetStatus()), Primary: v.GetStatus() == cryptov1.KeyStatus_KEY_STATUS_PRIMARY,
							LastEncrypt: lifecycle.Time(v.GetLastEncrypt()), LastUse: lifecycle.Time(v.GetLastUsed())}
						vs[v.GetKeyId()] = sv
					}
					srv.Keysets[k.GetKeyset()] = safety.ServedKeyset{Versions: vs}
				}
			}
			f.Servers = append(f.Servers, srv)
		}
	}
	return f
}

// versionUsage is one version's usage summed over a region's servers.
type versionUsage struct {
	Keyset      string    `json:"keyset"`
	KeyID       uint32    `json:"key_id"`
	ServedBy    int       `json:"served_by"` // servers serving it decrypting
	Servers     int       `json:"servers"`   // configured servers of the region
	Primary     int       `json:"primary_on"`
	Encrypts    uint64    `json:"encrypts"`
	Decrypts    uint64    `json:"decrypts"`
	LastUse     time.Time `json:"last_use,omitzero"`
	LastEncrypt time.Time `json:"last_encrypt,omitzero"`
	HistoryLost bool      `json:"history_lost,omitempty"`
	Record      string    `json:"record_state,omitempty"`
	Next        string    `json:"next_step,omitempty"`
}

// usage sums the region's reports per keyset version, sorted.
func (o *observation) usage(region string) []*versionUsage {
	servers := o.Regions[region]
	m := map[string]map[uint32]*versionUsage{}
	for _, s := range servers {
		for _, k := range s.Status.GetKeysets() {
			if m[k.GetKeyset()] == nil {
				m[k.GetKeyset()] = map[uint32]*versionUsage{}
			}
			for _, v := range k.GetVersions() {
				u := m[k.GetKeyset()][v.GetKeyId()]
				if u == nil {
					u = &versionUsage{Keyset: k.GetKeyset(), KeyID: v.GetKeyId(), Servers: len(servers)}
					m[k.GetKeyset()][v.GetKeyId()] = u
				}
				if decrypts(v.GetStatus()) {
					u.ServedBy++
				}
				if v.GetStatus() == cryptov1.KeyStatus_KEY_STATUS_PRIMARY {
					u.Primary++
				}
				u.Encrypts += v.GetEncryptCount()
				u.Decrypts += v.GetDecryptCount()
				u.HistoryLost = u.HistoryLost || v.GetHistoryLost()
				if t := lifecycle.Time(v.GetLastUsed()); t.After(u.LastUse) {
					u.LastUse = t
				}
				if t := lifecycle.Time(v.GetLastEncrypt()); t.After(u.LastEncrypt) {
					u.LastEncrypt = t
				}
			}
		}
	}
	var out []*versionUsage
	for _, name := range slices.Sorted(maps.Keys(m)) {
		for _, id := range slices.Sorted(maps.Keys(m[name])) {
			out = append(out, m[name][id])
		}
	}
	return out
}

// propagationRequest is what RecordPropagation records for region, or nil
// when a server of the region did not answer or serves nothing yet (unknown
// counts as in use, so nothing is recorded rather than a partial view).
func (o *observation) propagationRequest(region string, records []*statev1.KeysetRecord) *rootkmsv1.RecordPropagationRequest {
	if len(o.unreachable(region)) > 0 || len(o.Regions[region]) == 0 {
		return nil
	}
	for _, srv := range o.Regions[region] {
		if srv.Status.GetState() != kmsv1.ServingState_SERVING_STATE_SERVING {
			// A server not serving yet may hold a persisted bundle it has
			// not loaded: what it needs is unknown.
			return nil
		}
	}
	req := &rootkmsv1.RecordPropagationRequest{Region: region}
	var ks *statev1.KeysetObservation
	for _, u := range o.usage(region) {
		if ks == nil || ks.GetKeyset() != u.Keyset {
			ks = &statev1.KeysetObservation{Keyset: u.Keyset}
			req.Keysets = append(req.Keysets, ks)
		}
		v := &statev1.VersionObservation{KeyId: u.KeyID, ServedByAll: u.ServedBy == u.Servers, ServedAsPrimary: u.Primary > 0, EncryptCount: u.Encrypts, DecryptCount: u.Decrypts}
		if !u.LastEncrypt.IsZero() {
			v.LastEncrypt = timestamppb.New(u.LastEncrypt)
		}
		if !u.LastUse.IsZero() {
			v.LastUse = timestamppb.New(u.LastUse)
		}
		ks.Versions = append(ks.Versions, v)
	}
	// The region key versions every server's served bundle needs: a
	// version any of them needs must not retire (a restart could not unwrap
	// its keysets).
	versions := map[uint32]bool{}
	for _, srv := range o.Regions[region] {
		for _, v := range srv.Status.GetRegionKeyVersions() {
			versions[v] = true
		}
	}
	req.RegionKeyVersions = slices.Sorted(maps.Keys(versions))
	return req
}

// record writes the observation of every fully reachable region to the
// root KMS, printing one line per region.
func (o *observation) record(ctx context.Context, r *root, records []*statev1.KeysetRecord, w io.Writer) error {
	var errs []error
	for _, region := range slices.Sorted(maps.Keys(o.Regions)) {
		req := o.propagationRequest(region, records)
		if req == nil {
			fmt.Fprintf(w, "not recorded: region %s: %d of %d server(s) unreachable or not serving; nothing recorded for it (unknown counts as in use)\n",
				region, len(o.unreachable(region)), len(o.Regions[region]))
			continue
		}
		if err := r.do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
			_, err := c.RecordPropagation(ctx, req)
			return err
		}); err != nil {
			errs = append(errs, fmt.Errorf("recording region %s: %w", region, err))
			continue
		}
		fmt.Fprintf(w, "recorded: region %s: %d keyset(s) as served by all %d server(s)\n", region, len(req.GetKeysets()), len(o.Regions[region]))
	}
	return errors.Join(errs...)
}

// waiting reports whether version v of rec waits to be promoted: it was
// added after rec's primary and never promoted. One added before the
// primary (two versions waited and the newer was promoted) never will be:
// promoting it would put an older key back over a newer one (and its
// creation time would make a rotation due at once); it is an enabled,
// decrypt-only version that retires like any other. The record keeps the
// versions in the order they were added (key IDs are random).
func waiting(rec *statev1.KeysetRecord, v *statev1.KeysetVersionRecord) bool {
	if v.GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED || v.GetPrimarySince() != nil || v.GetSupersededAt() != nil {
		return false
	}
	vs := rec.GetVersions()
	primary := slices.IndexFunc(vs, func(x *statev1.KeysetVersionRecord) bool {
		return x.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY
	})
	return slices.IndexFunc(vs, func(x *statev1.KeysetVersionRecord) bool { return x.GetKeyId() == v.GetKeyId() }) > primary
}

// nextStep says what comes next for version v of rec and when it is safe,
// judged fleet-wide on the observation.
func nextStep(rec *statev1.KeysetRecord, v *statev1.KeysetVersionRecord, fleet safety.Fleet, p safety.Params, now time.Time) string {
	when := func(err error, verb string) string {
		if err == nil {
			return verb + ": safe now"
		}
		var ref *safety.Refusal
		if errors.As(err, &ref) {
			if ref.Earliest.IsZero() {
				return verb + ": not yet (blocked: " + blockers(ref) + ")"
			}
			return verb + ": not before " + tsTime(ref.Earliest)
		}
		return verb + ": " + err.Error()
	}
	switch v.GetState() {
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY:
		return "-"
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED:
		if waiting(rec, v) {
			return when(safety.CheckPromote(lifecycle.Keyset(rec), v.GetKeyId(), fleet, safety.ScopeFleet, p, now), "promote")
		}
		return when(safety.CheckRetire(lifecycle.Keyset(rec), v.GetKeyId(), fleet, safety.ScopeFleet, p, now), "disable")
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_DISABLED:
		return "schedule destroy: safe now"
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED:
		if t := lifecycle.Time(v.GetDestroyAfter()); t.After(now) {
			return "destroy: not before " + tsTime(t)
		}
		return "destroy: safe now"
	}
	return "-"
}

func blockers(r *safety.Refusal) string {
	var out []string
	for _, b := range r.Blockers {
		out = append(out, b.String())
		if len(out) == 3 {
			break
		}
	}
	return strings.Join(out, "; ")
}

// statusCmd is status (record: --record) and observe (always records).
func statusCmd(alwaysRecord bool) command {
	name := "status"
	if alwaysRecord {
		name = "observe"
	}
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fs := newFlags(name, stderr)
		o := &options{}
		o.register(fs, withRoot|withKMS|withJSON|withWindow)
		var region string
		record := alwaysRecord
		fs.StringVar(&region, "region", "", "only this region")
		if !alwaysRecord {
			fs.BoolVar(&record, "record", false, "also record what was seen in the root KMS (RecordPropagation per region)")
		}
		if err := parse(fs, args); err != nil {
			return err
		}
		if err := o.load(); err != nil {
			return err
		}
		regions, err := o.regions(region)
		if err != nil {
			return err
		}
		src, err := o.source()
		if err != nil {
			return err
		}
		obs, err := observe(ctx, src, regions, o.timeout)
		if err != nil {
			return err
		}
		var records []*statev1.KeysetRecord
		var r *root
		var errs []error
		if len(o.rootAddrs()) > 0 {
			if r, err = o.root(); err != nil {
				return err
			}
			defer r.Close()
			if records, err = r.listKeysets(ctx, "", true); err != nil {
				errs = append(errs, fmt.Errorf("reading the record: %w", err))
				r = nil
			}
		} else if record {
			return fmt.Errorf("--record needs the root KMS (give --rootkms or rootkms in the config file)")
		}
		if record && r != nil {
			if err := obs.record(ctx, r, records, stderrOr(o.json, stdout, stderr)); err != nil {
				errs = append(errs, err)
			} else if fresh, err := r.listKeysets(ctx, "", true); err == nil {
				records = fresh // the next steps as the record now stands
			}
		}
		p := safety.Params{Window: o.propagationWindow()}
		report := buildReport(obs, records, p)
		if o.json {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			if err := enc.Encode(report); err != nil {
				return err
			}
		} else {
			printReport(stdout, report, records != nil)
		}
		for _, region := range slices.Sorted(maps.Keys(obs.Regions)) {
			if n := len(obs.unreachable(region)); n > 0 {
				errs = append(errs, fmt.Errorf("region %s: %d server(s) unreachable", region, n))
			}
		}
		return errors.Join(errs...)
	}
}

func stderrOr(useStderr bool, stdout, stderr io.Writer) io.Writer {
	if useStderr {
		return stderr
	}
	return stdout
}

type regionReport struct {
	Region   string          `json:"region"`
	Servers  []serverReport  `json:"servers"`
	Versions []*versionUsage `json:"versions"`
}

type serverReport struct {
	Address string `json:"address"`
	ID      string `json:"id,omitempty"` // the SPIFFE ID it proved
	State   string `json:"state"`
	Serial  uint64 `json:"serial"`
	SHA256  string `json:"sha256,omitempty"`
	Error   string `json:"error,omitempty"`
}

func buildReport(obs *observation, records []*statev1.KeysetRecord, p safety.Params) []regionReport {
	byName := map[string]*statev1.KeysetRecord{}
	for _, rec := range records {
		byName[rec.GetName()] = rec
	}
	fleet := obs.fleet()
	var out []regionReport
	for _, region := range slices.Sorted(maps.Keys(obs.Regions)) {
		rr := regionReport{Region: region}
		for _, s := range obs.Regions[region] {
			sr := serverReport{Address: s.Addr, ID: s.ID}
			if s.Err != nil {
				sr.State, sr.Error = "UNREACHABLE", s.Err.Error()
			} else {
				sr.State = strings.TrimPrefix(s.Status.GetState().String(), "SERVING_STATE_")
				sr.Serial = s.Status.GetBundle().GetSerial()
				sr.SHA256 = hex.EncodeToString(s.Status.GetBundle().GetSha256())
				if s.Status.GetNotReadyReason() != "" {
					sr.Error = s.Status.GetNotReadyReason()
				}
			}
			rr.Servers = append(rr.Servers, sr)
		}
		usage := obs.usage(region)
		seen := map[string]bool{}
		for _, u := range usage {
			seen[fmt.Sprintf("%s/%d", u.Keyset, u.KeyID)] = true
		}
		// Record versions no server reports (e.g. added, not pushed yet).
		for _, rec := range records {
			if !slices.Contains(rec.GetRegions(), region) {
				continue
			}
			for _, v := range rec.GetVersions() {
				if !seen[fmt.Sprintf("%s/%d", rec.GetName(), v.GetKeyId())] {
					usage = append(usage, &versionUsage{Keyset: rec.GetName(), KeyID: v.GetKeyId(), Servers: len(obs.Regions[region])})
				}
			}
		}
		slices.SortStableFunc(usage, func(a, b *versionUsage) int { return strings.Compare(a.Keyset, b.Keyset) })
		for _, u := range usage {
			rec, ok := byName[u.Keyset]
			switch {
			case records == nil:
			case !ok:
				u.Record = "not in record"
			default:
				u.Record = "not in record"
				for _, v := range rec.GetVersions() {
					if v.GetKeyId() == u.KeyID {
						u.Record = stateName(v.GetState())
						u.Next = nextStep(rec, v, fleet, p, obs.At)
					}
				}
			}
		}
		rr.Versions = usage
		out = append(out, rr)
	}
	return out
}

func printReport(w io.Writer, report []regionReport, withRecord bool) {
	for _, rr := range report {
		fmt.Fprintf(w, "region %s\n", rr.Region)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  SERVER\tSTATE\tSERIAL\tSHA256\tNOTE")
		for _, s := range rr.Servers {
			sha := s.SHA256
			if len(sha) > 12 {
				sha = sha[:12]
			}
			if sha == "" {
				sha = "-"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%d\t%s\t%s\n", s.Address, s.State, s.Serial, sha, s.Error)
		}
		tw.Flush()
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		head := "  KEYSET\tKEY ID\tSERVED\tENCRYPTS\tDECRYPTS\tLAST USE\tLAST ENCRYPT"
		if withRecord {
			head += "\tRECORD\tNEXT STEP"
		}
		fmt.Fprintln(tw, head)
		for _, u := range rr.Versions {
			served := fmt.Sprintf("%d/%d", u.ServedBy, u.Servers)
			if u.Primary > 0 {
				served += " primary"
			}
			if u.HistoryLost {
				served += " history-lost"
			}
			line := fmt.Sprintf("  %s\t%d\t%s\t%d\t%d\t%s\t%s", u.Keyset, u.KeyID, served, u.Encrypts, u.Decrypts, tsTime(u.LastUse), tsTime(u.LastEncrypt))
			if withRecord {
				line += fmt.Sprintf("\t%s\t%s", u.Record, u.Next)
			}
			fmt.Fprintln(tw, line)
		}
		tw.Flush()
	}
}
