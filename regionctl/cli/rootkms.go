package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	regionname "github.com/cairnkms/cairn/internal/region"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/regionctl/config"
	"github.com/cairnkms/cairn/regionctl/store"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// rootKMSFlags are the flags of the commands that call the root KMS.
type rootKMSFlags struct {
	id      identity.Flags
	addrs   string
	timeout time.Duration
}

func (f *rootKMSFlags) register(fs *flag.FlagSet) {
	f.id.Register(fs)
	fs.StringVar(&f.addrs, "rootkms", "", "comma-separated API addresses (host:port) of root KMS replicas (required)")
	fs.DurationVar(&f.timeout, "timeout", DefaultTimeout, "deadline of each root KMS call")
}

func (f *rootKMSFlags) client() (*rootkmsclient.Client, *identity.Source, error) {
	src, err := source(&f.id)
	if err != nil {
		return nil, nil, err
	}
	return rootkmsclient.New(src, identity.SplitList(f.addrs)), src, nil
}

func regionCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("region create", stderr)
	var (
		rf     rootKMSFlags
		region string
	)
	rf.register(fs)
	fs.StringVar(&region, "region", "", "the region to create, e.g. us-east (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if len(identity.SplitList(rf.addrs)) == 0 || region == "" {
		return usageError(fs, "--rootkms and --region are required")
	}
	if err := regionname.ValidName(region); err != nil {
		return usageError(fs, "--region: %v", err)
	}
	client, _, err := rf.client()
	if err != nil {
		return err
	}
	defer client.Close()
	var r *rootkmsv1.Region
	err = client.Do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		ctx, cancel := context.WithTimeout(ctx, rf.timeout)
		defer cancel()
		var err error
		r, err = c.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: region})
		return err
	})
	if err != nil {
		return err
	}
	var versions []string
	for _, v := range r.GetVersions() {
		versions = append(versions, fmt.Sprintf("%d (%s)", v.GetKeyId(), strings.TrimPrefix(v.GetStatus().String(), "KEY_STATUS_")))
	}
	fmt.Fprintf(stdout, "region %s created: primary master key version %d, versions %s, created at %s, commit index %d\n",
		r.GetName(), r.GetPrimaryVersion(), strings.Join(versions, ", "), r.GetCreatedAt().AsTime().UTC().Format(time.RFC3339), r.GetCommitIndex())
	return nil
}

func keysetCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("keyset create", stderr)
	var (
		rf               rootKMSFlags
		teams, dir, only string
	)
	rf.register(fs)
	fs.StringVar(&teams, "teams", "", "directory of team config files (*.json) (required)")
	fs.StringVar(&dir, "store", "", "keyset store directory (required)")
	fs.StringVar(&only, "only", "", "create only this keyset")
	if err := parse(fs, args); err != nil {
		return err
	}
	if len(identity.SplitList(rf.addrs)) == 0 || teams == "" || dir == "" {
		return usageError(fs, "--rootkms, --teams and --store are required")
	}
	if only != "" {
		if err := keysets.ValidName(only); err != nil {
			return usageError(fs, "--only: %v", err)
		}
	}
	client, src, err := rf.client()
	if err != nil {
		return err
	}
	defer client.Close()
	good, bad, err := config.LoadDir(teams, src.TrustDomain())
	if err != nil {
		return err
	}
	reportBadTeams(stderr, bad, "no keyset of theirs is created")
	st, err := store.Open(dir)
	if err != nil {
		return err
	}
	var todo []config.Keyset
	for _, t := range good {
		for _, k := range t.Keysets {
			if only == "" || k.Name == only {
				todo = append(todo, k)
			}
		}
	}
	if only != "" && len(todo) == 0 {
		return fmt.Errorf("keyset %q is not in any valid team config under %s", only, teams)
	}
	slices.SortFunc(todo, func(a, b config.Keyset) int { return strings.Compare(a.Name, b.Name) })
	var created, existing int
	var errs []error
	for _, k := range todo {
		if copies, err := st.Get(k.Name); err == nil {
			existing++
			if stored := store.Regions(copies); !sameRegions(stored, k.Regions) {
				fmt.Fprintf(stderr, "warning: keyset %s is configured for %v but stored for %v; adding or removing regions of an existing keyset is not supported yet\n", k.Name, k.Regions, stored)
			}
			continue
		} else if !errors.Is(err, store.ErrNotFound) {
			errs = append(errs, err)
			continue
		}
		var resp *rootkmsv1.KeysetResponse
		err := client.Do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
			ctx, cancel := context.WithTimeout(ctx, rf.timeout)
			defer cancel()
			var err error
			resp, err = c.GenerateKeyset(ctx, &rootkmsv1.GenerateKeysetRequest{Name: k.Name, Regions: k.Regions, Template: k.Template})
			return err
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("generating %s: %w", k.Name, err))
			continue
		}
		if err := checkGenerated(k, resp.GetKeysets()); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := st.Put(k.Name, resp.GetKeysets()); err != nil {
			errs = append(errs, err)
			continue
		}
		created++
		c := resp.GetKeysets()[0]
		template := k.Template
		if template == "" {
			template = keysets.DefaultTemplate
		}
		fmt.Fprintf(stdout, "created keyset %s (team %s, %s, primary key %d) for %s\n", k.Name, k.Team, template, c.GetPrimaryKeyId(), strings.Join(k.Regions, ", "))
	}
	fmt.Fprintf(stdout, "%d created, %d already in the store, %d failed\n", created, existing, len(errs))
	return errors.Join(errs...)
}

// checkGenerated checks that the root KMS answered with one copy per
// requested region, in order, of the requested keyset.
func checkGenerated(k config.Keyset, copies []*cryptov1.EncryptedKeyset) error {
	if got := store.Regions(copies); !slices.Equal(got, k.Regions) {
		return fmt.Errorf("root KMS answered keyset %s with copies for %v, want %v; not stored", k.Name, got, k.Regions)
	}
	if err := store.Check(k.Name, copies); err != nil {
		return fmt.Errorf("root KMS answer for %s: %w; not stored", k.Name, err)
	}
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
