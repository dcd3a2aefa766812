# Evaluates a Vagrantfile without Vagrant or a hypervisor: Vagrant.configure yields a
# recorder, and every configuration call is printed as JSON (tests/unit/test_playbooks_vagrant.py).
#   ruby stub_vagrant.rb path/to/Vagrantfile
require "json"

$calls = []

class Recorder
  def initialize(path)
    @path = path
  end

  def method_missing(name, *args, **kw, &blk)
    n = name.to_s
    if n.end_with?("=")
      $calls << { "path" => "#{@path}.#{n.chomp("=")}", "value" => args[0] }
      return args[0]
    end
    label = args.empty? ? n : "#{n}(#{args.map(&:to_s).join(",")})"
    $calls << { "path" => "#{@path}.#{n}", "args" => args.map { |a| a.is_a?(Symbol) ? a.to_s : a }, "kw" => kw }
    child = Recorder.new("#{@path}.#{label}")
    blk&.call(child)
    child
  end

  def respond_to_missing?(*)
    true
  end
end

module Vagrant
  def self.configure(version)
    raise "unexpected config version #{version}" unless version == "2"
    yield Recorder.new("config")
  end
end

load ARGV.fetch(0)
puts JSON.generate($calls)
