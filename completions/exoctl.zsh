#compdef exoctl

_exoctl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _EXOCTL_COMPLETE=complete_zsh exoctl)
}

compdef _exoctl_completion exoctl