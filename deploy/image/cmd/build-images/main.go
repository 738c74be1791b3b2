// Command build-images builds Cairn's binaries for Linux and writes one
// container image tarball per binary and platform, without a Docker daemon
// (`make image`). Load one with `docker load -i`, `podman load -i`, or push
// it with `crane push`. See deploy/image/README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/cairnkms/cairn/deploy/image"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("build-images", flag.ContinueOnError)
	fs.SetOutput(stderr)
	repo := fs.String("repo", "", "`directory` of the Cairn repository (default: found above the working directory)")
	out := fs.String("out", "", "`directory` for the tarballs (default <repo>/bin/images)")
	version := fs.String("version", "", "image tag and version label (default `git describe --tags --always --dirty`, else dev)")
	platforms := fs.String("platforms", "linux/amd64", "comma-separated `os/arch[/variant]` list, e.g. linux/amd64,linux/arm64 (safe needs cgo: only this machine's arch)")
	binaries := fs.String("binaries", strings.Join(image.Binaries, ","), "comma-separated `names` of the binaries to build")
	prefix := fs.String("prefix", "cairn", "repository part of the tags: `prefix`/<binary>:<version>")
	epoch := fs.String("source-date-epoch", os.Getenv("SOURCE_DATE_EPOCH"), "every time in the images, in Unix `seconds` (default $SOURCE_DATE_EPOCH, else the HEAD commit's time, else 0)")
	goCmd := fs.String("go", "go", "the go `command`")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "build-images: unexpected arguments %q\n", fs.Args())
		return 2
	}

	o := image.Options{Prefix: *prefix, Go: *goCmd, Out: *out}
	var err error
	if o.Repo = *repo; o.Repo == "" {
		wd, err := os.Getwd()
		if err == nil {
			o.Repo, err = image.RepoRoot(wd)
		}
		if err != nil {
			fmt.Fprintf(stderr, "build-images: %v\n", err)
			return 1
		}
	}
	if o.Repo, err = filepath.Abs(o.Repo); err != nil {
		fmt.Fprintf(stderr, "build-images: %v\n", err)
		return 1
	}
	if o.Out == "" {
		o.Out = filepath.Join(o.Repo, "bin", "images")
	}
	for _, p := range strings.Split(*platforms, ",") {
		pl, err := image.ParsePlatform(strings.TrimSpace(p))
		if err != nil {
			fmt.Fprintf(stderr, "build-images: -platforms: %v\n", err)
			return 2
		}
		o.Platforms = append(o.Platforms, pl)
	}
	for _, b := range strings.Split(*binaries, ",") {
		if b = strings.TrimSpace(b); b != "" {
			o.Binaries = append(o.Binaries, b)
		}
	}

	git := image.ReadGit(ctx, o.Repo)
	o.Revision = git.Revision
	if o.Version = *version; o.Version == "" {
		if o.Version = git.Version; o.Version == "" {
			o.Version = "dev"
		}
	}
	switch {
	case *epoch != "":
		s, err := strconv.ParseInt(*epoch, 10, 64)
		if err != nil || s < 0 {
			fmt.Fprintf(stderr, "build-images: -source-date-epoch %q is not a count of seconds\n", *epoch)
			return 2
		}
		o.Created = time.Unix(s, 0).UTC()
	case !git.CommitTime.IsZero():
		o.Created = git.CommitTime
	default:
		o.Created = time.Unix(0, 0).UTC()
	}

	fmt.Fprintf(stderr, "building %s for %s (version %s, created %s) into %s ...\n",
		strings.Join(o.Binaries, ", "), *platforms, o.Version, o.Created.Format(time.RFC3339), o.Out)
	results, err := image.BuildAll(ctx, o)
	if err != nil {
		fmt.Fprintf(stderr, "build-images: %v\n", err)
		return 1
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TAG\tPLATFORM\tBINARY\tLAYER\tTARBALL\tLINKAGE\tDIGEST")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Tag, platformString(r.Platform),
			mib(r.BinarySize), mib(r.LayerSize), rel(o.Repo, r.Path), linkage(r.Linkage), r.Digest)
	}
	if err := tw.Flush(); err != nil {
		fmt.Fprintf(stderr, "build-images: %v\n", err)
		return 1
	}
	return 0
}

func platformString(p v1.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

func linkage(l image.Linkage) string {
	if l.Static() {
		return "static"
	}
	return "glibc (" + strings.Join(l.Needed, " ") + ")"
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func rel(base, p string) string {
	if r, err := filepath.Rel(base, p); err == nil && !strings.HasPrefix(r, "..") {
		return r
	}
	return p
}
