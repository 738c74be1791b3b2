package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/keysets"
	regionname "github.com/cairnkms/cairn/internal/region"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
)

// printJSON writes m as protojson, indented by encoding/json: protojson
// varies its whitespace on purpose, and scripts deserve stable output.
func printJSON(w io.Writer, m proto.Message) error {
	data, err := protojson.Marshal(m)
	if err != nil {
		return err
	}
	var out bytes.Buffer
	if err := json.Indent(&out, data, "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = w.Write(out.Bytes())
	return err
}

func ts(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().UTC().Format(time.RFC3339)
}

func tsTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func stateName(s statev1.KeysetVersionState) string {
	return strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(s.String(), "KEYSET_VERSION_STATE_"), "_", "-"))
}

// refused prints a root KMS refusal (the Safety Condition's message names
// the version, the blockers and the earliest safe time) as is.
func refused(err error) error {
	if st, ok := status.FromError(err); ok && st.Code() == codes.FailedPrecondition {
		return fmt.Errorf("REFUSED by the root KMS: %s", st.Message())
	}
	return err
}

// --- regions ---

func regionFlags(name string, stderr io.Writer, what int) (*flag.FlagSet, *options) {
	fs := newFlags(name, stderr)
	o := &options{}
	o.register(fs, withRoot|what)
	return fs, o
}

func regionList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("region list", stderr, withJSON)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	resp, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.ListRegionsResponse, error) {
		return c.ListRegions(ctx, &rootkmsv1.ListRegionsRequest{})
	})
	if err != nil {
		return err
	}
	if o.json {
		return printJSON(stdout, resp)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REGION\tPRIMARY\tVERSIONS\tCREATED")
	for _, reg := range resp.GetRegions() {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", reg.GetName(), reg.GetPrimaryVersion(), regionVersions(reg), ts(reg.GetCreatedAt()))
	}
	return tw.Flush()
}

func regionVersions(r *rootkmsv1.Region) string {
	var versions []string
	for _, v := range r.GetVersions() {
		versions = append(versions, fmt.Sprintf("%d (%s)", v.GetKeyId(), strings.TrimPrefix(v.GetStatus().String(), "KEY_STATUS_")))
	}
	return strings.Join(versions, ", ")
}

// regionWrite runs one region write command.
func regionWrite(ctx context.Context, name string, args []string, stdout, stderr io.Writer, withVersion bool,
	call func(context.Context, rootkmsv1.RootKMSClient, string, uint32) (*rootkmsv1.Region, error), done string) error {
	fs, o := regionFlags(name, stderr, withJSON)
	var region string
	var version uint
	fs.StringVar(&region, "region", "", "the region, e.g. us-east (required)")
	if withVersion {
		fs.UintVar(&version, "version", 0, "the region master key version (required)")
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if region == "" || (withVersion && version == 0) {
		if withVersion {
			return usageError(fs, "--region and --version are required")
		}
		return usageError(fs, "--region is required")
	}
	if err := regionname.ValidName(region); err != nil {
		return usageError(fs, "--region: %v", err)
	}
	if err := o.load(); err != nil {
		return err
	}
	if len(o.rootAddrs()) == 0 {
		return usageError(fs, "--rootkms (or rootkms in the config file) is required")
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	reg, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.Region, error) {
		return call(ctx, c, region, uint32(version))
	})
	if err != nil {
		return refused(err)
	}
	if o.json {
		return printJSON(stdout, reg)
	}
	fmt.Fprintf(stdout, "region %s %s: primary master key version %d, versions %s, created at %s, commit index %d\n",
		reg.GetName(), done, reg.GetPrimaryVersion(), regionVersions(reg), ts(reg.GetCreatedAt()), reg.GetCommitIndex())
	return nil
}

func regionCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return regionWrite(ctx, "region create", args, stdout, stderr, false, func(ctx context.Context, c rootkmsv1.RootKMSClient, region string, _ uint32) (*rootkmsv1.Region, error) {
		return c.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: region})
	}, "created")
}

func regionRotateKey(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return regionWrite(ctx, "region rotate-key", args, stdout, stderr, false, func(ctx context.Context, c rootkmsv1.RootKMSClient, region string, _ uint32) (*rootkmsv1.Region, error) {
		return c.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: region})
	}, "rotated (run regionctl keyset rewrap, build and push, before retiring the old version)")
}

func regionRetireKey(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return regionWrite(ctx, "region retire-key", args, stdout, stderr, true, func(ctx context.Context, c rootkmsv1.RootKMSClient, region string, v uint32) (*rootkmsv1.Region, error) {
		return c.RetireRegionKeyVersion(ctx, &rootkmsv1.RetireRegionKeyVersionRequest{Region: region, Version: v})
	}, "key version retired")
}

// --- keysets ---

// listKeysets reads the record: every keyset, or a region's.
func (r *root) listKeysets(ctx context.Context, region string, copies bool) ([]*statev1.KeysetRecord, error) {
	var out []*statev1.KeysetRecord
	for token := ""; ; {
		resp, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.ListKeysetsResponse, error) {
			return c.ListKeysets(ctx, &rootkmsv1.ListKeysetsRequest{Region: region, IncludeCopies: copies, PageToken: token})
		})
		if err != nil {
			return nil, err
		}
		if w := resp.GetPropagationWindow(); w != nil && r.window != nil {
			*r.window = w.AsDuration()
		}
		for _, k := range resp.GetKeysets() {
			out = append(out, k.GetRecord())
		}
		if token = resp.GetNextPageToken(); token == "" {
			return out, nil
		}
	}
}

func keysetList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("keyset list", stderr, withJSON)
	var region string
	fs.StringVar(&region, "region", "", "list only the keysets served in this region")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	records, err := r.listKeysets(ctx, region, false)
	if err != nil {
		return err
	}
	if o.json {
		resp := &rootkmsv1.ListKeysetsResponse{PropagationWindow: durationpb.New(o.rootWindow)}
		for _, rec := range records {
			resp.Keysets = append(resp.Keysets, &rootkmsv1.Keyset{Record: rec})
		}
		return printJSON(stdout, resp)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEYSET\tREGIONS\tPRIMARY\tVERSIONS\tTTL\tROTATION\tREVISION")
	for _, rec := range records {
		var primary string = "-"
		var vs []string
		for _, v := range rec.GetVersions() {
			if v.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY {
				primary = fmt.Sprint(v.GetKeyId())
			}
			vs = append(vs, fmt.Sprintf("%d %s", v.GetKeyId(), stateName(v.GetState())))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\n", rec.GetName(), strings.Join(rec.GetRegions(), ","), primary, strings.Join(vs, ", "),
			compile.TTLInForce(rec), rec.GetRotationPeriod().AsDuration(), rec.GetRevision())
	}
	return tw.Flush()
}

func (r *root) getKeyset(ctx context.Context, name string) (*statev1.KeysetRecord, error) {
	k, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return c.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: name})
	})
	if err != nil {
		return nil, err
	}
	return k.GetRecord(), nil
}

func keysetShow(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("keyset show", stderr, withJSON)
	name, err := parseNamed(fs, args, true)
	if err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	rec, err := r.getKeyset(ctx, name)
	if err != nil {
		return err
	}
	if o.json {
		return printJSON(stdout, rec)
	}
	showKeyset(stdout, rec)
	return nil
}

func showKeyset(w io.Writer, rec *statev1.KeysetRecord) {
	fmt.Fprintf(w, "keyset %s (revision %d, updated %s)\n", rec.GetName(), rec.GetRevision(), ts(rec.GetUpdatedAt()))
	fmt.Fprintf(w, "regions: %s\ncreated %s by %s\n", strings.Join(rec.GetRegions(), ", "), ts(rec.GetCreatedAt()), rec.GetCreatedBy())
	fmt.Fprintf(w, "rotation period: %s\nciphertext TTL: %s\n", rec.GetRotationPeriod().AsDuration(), compile.TTLInForce(rec))
	fmt.Fprintln(w, "TTL history:")
	for _, p := range rec.GetTtlHistory() {
		until := "now"
		if p.GetUntil() != nil {
			until = ts(p.GetUntil())
		}
		fmt.Fprintf(w, "  %s from %s until %s\n", p.GetTtl().AsDuration(), ts(p.GetFrom()), until)
	}
	fmt.Fprintln(w, "versions:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  KEY ID\tSTATE\tTEMPLATE\tCREATED\tPROPAGATED\tPRIMARY SINCE\tSUPERSEDED\tDISABLED\tDESTROY AFTER\tENCRYPTS")
	for _, v := range rec.GetVersions() {
		var prop []string
		for _, p := range v.GetPropagated() {
			prop = append(prop, p.GetRegion()+"="+ts(p.GetAt()))
		}
		if len(prop) == 0 {
			prop = []string{"-"}
		}
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", v.GetKeyId(), stateName(v.GetState()), v.GetTemplate(), ts(v.GetCreatedAt()),
			strings.Join(prop, " "), ts(v.GetPrimarySince()), ts(v.GetSupersededAt()), ts(v.GetDisabledAt()), ts(v.GetDestroyAfter()), v.GetEncryptCount())
	}
	tw.Flush()
}

func keysetCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("keyset create", stderr, withTeams)
	var only string
	fs.StringVar(&only, "only", "", "create only this keyset")
	if err := parse(fs, args); err != nil {
		return err
	}
	if only != "" {
		if err := keysets.ValidName(only); err != nil {
			return usageError(fs, "--only: %v", err)
		}
	}
	if err := o.load(); err != nil {
		return err
	}
	if o.teams == "" || len(o.rootAddrs()) == 0 {
		return usageError(fs, "--rootkms and --teams (or rootkms and teams in the config file) are required")
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	good, bad, err := config.LoadDir(o.teams, r.src.TrustDomain())
	if err != nil {
		return err
	}
	reportBadTeams(stderr, bad, "no keyset of theirs is created")
	var todo []config.Keyset
	for _, t := range good {
		for _, k := range t.Keysets {
			if only == "" || k.Name == only {
				todo = append(todo, k)
			}
		}
	}
	if only != "" && len(todo) == 0 {
		return fmt.Errorf("keyset %q is not in any valid team config under %s", only, o.teams)
	}
	slices.SortFunc(todo, func(a, b config.Keyset) int { return strings.Compare(a.Name, b.Name) })
	recs, err := r.listKeysets(ctx, "", false)
	if err != nil {
		return fmt.Errorf("reading the record: %w", err)
	}
	inRecord := map[string]*statev1.KeysetRecord{}
	for _, rec := range recs {
		inRecord[rec.GetName()] = rec
	}
	var created, existing int
	var errs []error
	for _, k := range todo {
		if rec, ok := inRecord[k.Name]; ok {
			existing++
			fmt.Fprintf(stdout, "exists: keyset %s (regions %s); left alone\n", k.Name, strings.Join(rec.GetRegions(), ", "))
			if !sameRegions(rec.GetRegions(), k.Regions) {
				fmt.Fprintf(stderr, "warning: keyset %s is configured for %v but the record has %v; changing a keyset's regions is not supported\n", k.Name, k.Regions, rec.GetRegions())
			}
			continue
		}
		var ks *rootkmsv1.Keyset
		err := r.do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) (err error) {
			ks, err = c.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: k.Name, Regions: k.Regions, Template: k.Template,
				CiphertextTtl: durationpb.New(k.CiphertextTTL), RotationPeriod: durationpb.New(k.RotationPeriod)})
			return err
		})
		if status.Code(err) == codes.AlreadyExists {
			existing++
			fmt.Fprintf(stdout, "exists: keyset %s (created meanwhile); left alone\n", k.Name)
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("creating %s: %w", k.Name, err))
			continue
		}
		created++
		rec := ks.GetRecord()
		var primary uint32
		if vs := rec.GetVersions(); len(vs) > 0 {
			primary = vs[0].GetKeyId()
		}
		template := k.Template
		if template == "" {
			template = keysets.DefaultTemplate
		}
		fmt.Fprintf(stdout, "created keyset %s (team %s, %s, primary key %d) for %s\n", k.Name, k.Team, template, primary, strings.Join(rec.GetRegions(), ", "))
	}
	fmt.Fprintf(stdout, "%d created, %d already in the record, %d failed\n", created, existing, len(errs))
	return errors.Join(errs...)
}

// A keyset lifecycle step on the command line.
type stepKind int

const (
	stepRotate stepKind = iota
	stepPromote
	stepDisable
	stepEnable
	stepDestroy
	stepUndestroy
	stepRewrap
)

var stepInfo = map[stepKind]struct {
	verb    string
	step    statev1.KeysetStep
	version bool
}{
	stepRotate:    {"rotate", statev1.KeysetStep_KEYSET_STEP_ADD_VERSION, false},
	stepPromote:   {"promote", statev1.KeysetStep_KEYSET_STEP_PROMOTE, true},
	stepDisable:   {"disable", statev1.KeysetStep_KEYSET_STEP_DISABLE, true},
	stepEnable:    {"enable", statev1.KeysetStep_KEYSET_STEP_ENABLE, true},
	stepDestroy:   {"destroy", statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, true},
	stepUndestroy: {"undestroy", statev1.KeysetStep_KEYSET_STEP_UNDESTROY, true},
	stepRewrap:    {"rewrap", statev1.KeysetStep_KEYSET_STEP_REWRAP, false},
}

func keysetStep(kind stepKind) command {
	info := stepInfo[kind]
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fs, o := regionFlags("keyset "+info.verb, stderr, withJSON)
		var (
			version  uint
			delay    time.Duration
			template string
		)
		if info.version {
			fs.UintVar(&version, "version", 0, "the version's key ID (required)")
		}
		if kind == stepDestroy {
			fs.DurationVar(&delay, "delay", 24*time.Hour, "how long until the material may be destroyed (undestroy works until then)")
		}
		if kind == stepRotate {
			fs.StringVar(&template, "template", "", "Tink key template of the new version (default AES256_GCM)")
		}
		name, err := parseNamed(fs, args, true)
		if err != nil {
			return err
		}
		if info.version && version == 0 {
			return usageError(fs, "--version is required")
		}
		if kind == stepDestroy && delay <= 0 {
			return usageError(fs, "--delay must be positive")
		}
		if err := o.load(); err != nil {
			return err
		}
		r, err := o.root()
		if err != nil {
			return err
		}
		defer r.Close()
		req := &rootkmsv1.UpdateKeysetRequest{Name: name, Step: info.step, KeyId: uint32(version), Template: template}
		if kind == stepDestroy {
			req.DestroyDelay = durationpb.New(delay)
		}
		rec, err := r.update(ctx, req)
		if err != nil {
			return refused(err)
		}
		if o.json {
			return printJSON(stdout, rec)
		}
		fmt.Fprintf(stdout, "%s: keyset %s is at revision %d; build and push its regions' bundles (%s) to serve it\n",
			describeStep(req, rec), name, rec.GetRevision(), strings.Join(rec.GetRegions(), ", "))
		return nil
	}
}

func (r *root) update(ctx context.Context, req *rootkmsv1.UpdateKeysetRequest) (*statev1.KeysetRecord, error) {
	k, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return c.UpdateKeyset(ctx, req)
	})
	if err != nil {
		return nil, err
	}
	return k.GetRecord(), nil
}

func describeStep(req *rootkmsv1.UpdateKeysetRequest, rec *statev1.KeysetRecord) string {
	switch req.GetStep() {
	case statev1.KeysetStep_KEYSET_STEP_ADD_VERSION:
		if vs := rec.GetVersions(); len(vs) > 0 {
			return fmt.Sprintf("added version %d (enabled, decrypt-only)", vs[len(vs)-1].GetKeyId())
		}
		return "added a version"
	case statev1.KeysetStep_KEYSET_STEP_PROMOTE:
		return fmt.Sprintf("promoted version %d", req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_DISABLE:
		return fmt.Sprintf("disabled version %d", req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_ENABLE:
		return fmt.Sprintf("enabled version %d", req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY:
		for _, v := range rec.GetVersions() {
			if v.GetKeyId() == req.GetKeyId() {
				return fmt.Sprintf("scheduled version %d for destruction after %s", req.GetKeyId(), ts(v.GetDestroyAfter()))
			}
		}
		return fmt.Sprintf("scheduled version %d for destruction", req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_UNDESTROY:
		return fmt.Sprintf("version %d is no longer scheduled for destruction (disabled)", req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_DESTROY:
		return fmt.Sprintf("destroyed version %d", req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_REWRAP:
		return "rewrapped the copies under each region's primary key"
	}
	return req.GetStep().String()
}

func keysetSetPolicy(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("keyset set-policy", stderr, withJSON)
	var ttl, rotation time.Duration
	fs.DurationVar(&ttl, "ttl", 0, "new ciphertext TTL (a decrease counts for retirement only once the old TTL has passed)")
	fs.DurationVar(&rotation, "rotation-period", 0, "new rotation period")
	name, err := parseNamed(fs, args, true)
	if err != nil {
		return err
	}
	if ttl < 0 || rotation < 0 || (ttl == 0 && rotation == 0) {
		return usageError(fs, "give a positive --ttl, --rotation-period or both")
	}
	if err := o.load(); err != nil {
		return err
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	req := &rootkmsv1.SetKeysetPolicyRequest{Name: name}
	if ttl > 0 {
		req.CiphertextTtl = durationpb.New(ttl)
	}
	if rotation > 0 {
		req.RotationPeriod = durationpb.New(rotation)
	}
	k, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return c.SetKeysetPolicy(ctx, req)
	})
	if err != nil {
		return refused(err)
	}
	if o.json {
		return printJSON(stdout, k.GetRecord())
	}
	rec := k.GetRecord()
	fmt.Fprintf(stdout, "keyset %s: ciphertext TTL %s, rotation period %s (revision %d); update the team file to match\n",
		name, compile.TTLInForce(rec), rec.GetRotationPeriod().AsDuration(), rec.GetRevision())
	return nil
}

// reportBadTeams prints every team file that was left out, loudly.
func reportBadTeams(w io.Writer, bad []config.FileError, consequence string) {
	if len(bad) == 0 {
		return
	}
	fmt.Fprintf(w, "WARNING: %d team config file(s) are invalid and were LEFT OUT; %s:\n", len(bad), consequence)
	for _, e := range bad {
		fmt.Fprintf(w, "  %s: %s\n", e.File, strings.ReplaceAll(e.Err.Error(), "\n", "\n    "))
	}
}

func sameRegions(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}
